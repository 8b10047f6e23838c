//! Renaming a VM: its record under the new name, the guest told its new host name.

use tracing::{info, warn};

use super::{Manager, SETTLED};
use crate::error::{ErrorChain, ManagerError};
use crate::event::EventKind;
use crate::name::VmName;
use crate::vm::VmRecord;
use crate::vm_state::VmState;

impl Manager {
    /// Renames VM `name` to `new`, in a settled state (running, paused or stopped).
    ///
    /// The record moves to the new name and an [`EventKind::Renamed`] event is
    /// stored in the same transaction; [`ManagerError::NameTaken`] if a VM is named
    /// `new` (checked in that transaction too, so two renames to one name cannot
    /// both win). Renaming a VM to its own name changes nothing.
    ///
    /// A running VM's guest is told its new host name through its agent; should the
    /// agent not answer, the rename stands (it is logged) and the guest gets the new
    /// name when it next boots, as every boot sets it. A paused or stopped VM gets it
    /// then too.
    pub async fn rename(&self, name: &VmName, new: VmName) -> Result<VmRecord, ManagerError> {
        if *name == new {
            let _guard = self.lock(name).await;
            let vm = self.get(name).await?;
            self.require(&vm, "rename", SETTLED)?;
            return Ok(vm);
        }
        // Both names' locks, in name order, so that two renames (or a rename and a
        // create) never wait on each other in a cycle.
        let (_first, _second) = match name <= &new {
            true => (self.lock(name).await, self.lock(&new).await),
            false => {
                let first = self.lock(&new).await;
                (first, self.lock(name).await)
            }
        };
        let mut vm = self.get(name).await?;
        self.require(&vm, "rename", SETTLED)?;
        let from = vm.name.clone();
        vm.name = new;
        if let Err(e) = self
            .save_with_event(&mut vm, EventKind::Renamed { from: from.clone() })
            .await
        {
            vm.name = from;
            return Err(e);
        }
        info!(vm = %vm.name, %from, "renamed");
        if vm.state == VmState::Running {
            let told = async {
                let client = self.agent(&vm).await?;
                client
                    .set_hostname(vm.name.as_str())
                    .await
                    .map_err(|e| ManagerError::agent(&vm.name, &e))
            }
            .await;
            if let Err(e) = told {
                warn!(vm = %vm.name, error = %ErrorChain(&e), "cannot tell the guest its new host name; it gets it at its next boot");
            }
        }
        Ok(vm)
    }
}

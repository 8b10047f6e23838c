//! The manager's side of VMM confinement: a uid per VM from create to delete, the
//! [`Confinement`] of each machine config, and a data directory that confined VMMs
//! can traverse but not read.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tracing::warn;

use super::Manager;
use super::reconcile::ReconcileReport;
use crate::confine::Confinement;
use crate::error::ManagerError;
use crate::vm::{VmId, VmRecord};

/// The directories of the data directory that no VMM may enter: kept consoles and
/// snapshots (memory of every VM).
const PRIVATE_DIRS: [&str; 2] = ["consoles", "snapshots"];

impl Manager {
    /// Gives `vm` its uid if VMMs are confined and it has none yet (it was created
    /// before confinement was turned on), recording it.
    pub(super) async fn ensure_uid(&self, vm: &mut VmRecord) -> Result<(), ManagerError> {
        let Some(confine) = &self.inner.config.confinement else {
            return Ok(());
        };
        if vm.resources.uid.is_some() {
            return Ok(());
        }
        let uid = self
            .inner
            .backends
            .store
            .allocate_uid(vm.id, &confine.uids)
            .await?;
        vm.resources.uid = Some(uid);
        self.save(vm).await
    }

    /// How the VMM of `vm` is confined, if VMMs are.
    pub(super) fn confinement_of(
        &self,
        vm: &VmRecord,
    ) -> Result<Option<Confinement>, ManagerError> {
        let Some(confine) = &self.inner.config.confinement else {
            return Ok(None);
        };
        let uid = vm.resources.uid.ok_or_else(|| {
            ManagerError::Store(crate::state_store::StoreError::Corrupt(format!(
                "VM {} has no VMM uid although VMMs are confined; restart the daemon to give it one",
                vm.name
            )))
        })?;
        Ok(Some(Confinement::new(uid, confine.limits)))
    }

    /// Releases the uid `vm` holds in the store, whatever its record says (a crash can
    /// come between taking it and recording it).
    pub(super) async fn release_uid_of(&self, vm: VmId) -> Result<(), ManagerError> {
        self.inner.backends.store.release_uid(vm).await?;
        Ok(())
    }

    /// Releases uids whose VM has no record, and gives a uid to every settled VM
    /// without one while VMMs are confined.
    pub(super) async fn sweep_uids(
        &self,
        records: &HashMap<VmId, VmRecord>,
        report: &mut ReconcileReport,
    ) -> Result<(), ManagerError> {
        let store = &self.inner.backends.store;
        for (vm, uid) in store.list_uids().await? {
            if !records.contains_key(&vm) {
                let released = store.release_uid(vm).await;
                self.swept(
                    report,
                    vm,
                    format!("release orphaned VMM uid {uid} of VM {vm}"),
                    released.map(drop).map_err(Into::into),
                )
                .await;
            }
        }
        if self.inner.config.confinement.is_some() {
            for vm in records.values() {
                if vm.resources.uid.is_none() && !vm.state.is_transient() {
                    let mut vm = vm.clone();
                    let given = self.ensure_uid(&mut vm).await.map(drop);
                    if let Err(e) = given {
                        self.swept(
                            report,
                            vm.id,
                            format!("give VM {} its VMM uid", vm.name),
                            Err(e),
                        )
                        .await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the data directory traverse-only (0711), so that a confined VMM can open
    /// its own disks and run directory by name, and the directories no VMM may enter
    /// private (0700). The state file and each VM's files are protected by their own
    /// modes. Only when VMMs are confined.
    pub(super) fn secure_data_dir(&self) -> Result<(), ManagerError> {
        if self.inner.config.confinement.is_none() {
            return Ok(());
        }
        let data = &self.inner.config.data_dir;
        if !data.is_dir() {
            // Nothing to secure yet (a library user's manager without files).
            return Ok(());
        }
        set_mode(data, 0o711, false)?;
        set_mode(&self.inner.config.run_root(), 0o711, true)?;
        for name in PRIVATE_DIRS {
            set_mode(&data.join(name), 0o700, true)?;
        }
        Ok(())
    }

    /// Hands a volume released to the operator back to root (a confined VMM owned it).
    pub(super) fn disown(&self, vm: &VmRecord, path: &Path) {
        if vm.resources.uid.is_none() {
            return;
        }
        if let Err(e) = std::os::unix::fs::chown(path, Some(0), Some(0)) {
            warn!(vm = %vm.name, path = %path.display(), error = %e, "cannot give the kept volume back to root");
        }
    }
}

/// Gives `dir` `mode`, creating it first when `create`; a missing directory that is
/// not to be created is left alone.
fn set_mode(dir: &Path, mode: u32, create: bool) -> Result<(), ManagerError> {
    let io = |e| ManagerError::Io {
        context: format!("cannot set mode {mode:o} on {}", dir.display()),
        source: e,
    };
    if create {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
    } else if !dir.exists() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io)
}

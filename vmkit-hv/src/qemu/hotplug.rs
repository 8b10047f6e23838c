//! Live vCPU resize: ACPI CPU hotplug over QMP.
//!
//! QEMU starts every VM with `-smp N,maxcpus=M`, so `M - N` CPU slots are free. A
//! grow plugs CPUs into the lowest free slots (`device_add` of the slot's CPU type
//! with its socket, core and thread ids, from `query-hotpluggable-cpus`); a shrink
//! unplugs the highest plugged slots (`device_del` by QOM path) and waits for the
//! guest to eject them. The plugged slots thus stay the lowest `N`, which is what a
//! VMM started with `-smp N` has, so a snapshot taken after a resize restores into
//! one.
//!
//! The guest has a part in both: Linux brings a plugged CPU up only when asked (the
//! vmkit agent onlines CPUs as they appear, as udev rules do elsewhere), and an
//! unplug completes only when the guest's ACPI code takes the CPU offline and
//! ejects it. A guest busy bringing the CPU up refuses the eject, so an unplug not
//! done yet is asked for again every few seconds. A paused guest can do neither, so
//! shrinking a paused VM is refused; a guest that does not eject within 30 s gets an
//! error that says so.

use std::time::Duration;

use serde_json::{Map, Value, json};
use vmkit_core::{HypervisorError, VmmHandle};

use super::supervisor::QmpClient;
use super::{Accel, Qemu};

const OP: &str = "resize";

/// How often an unplug is checked for having completed.
const EJECT_POLL: Duration = Duration::from_millis(100);
/// How often an unplug that has not completed is asked for again. A guest that is
/// still bringing the CPU up (the agent onlines it right after the plug) refuses
/// the eject, and QEMU does not ask twice by itself.
const EJECT_RETRY: Duration = Duration::from_secs(2);
/// How long the guest has to eject the CPUs: time for a loaded host running the
/// guest under TCG, where taking a CPU offline stops every vCPU. 30 s was seen to
/// fall short for a guest restored a moment earlier while the host compiled.
const EJECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Under TCG, QEMU 7.2 (the version tested here) crashes when a vCPU is plugged
/// into a VMM that has had one unplugged ("double free or corruption", or
/// `tcg_register_thread: assertion failed` once its `maxcpus` translation contexts
/// are used up: a removed vCPU's context is never reused). This file in the run
/// directory marks a VMM that has had a vCPU removed, so that a later plug is
/// refused instead of killing the VM. KVM is not affected.
const UNPLUGGED_FILE: &str = "vmkit-vcpu-unplugged";

/// Whether the VMM of `handle` (this process: pid and start time) has had a vCPU
/// removed.
fn has_unplugged(handle: &VmmHandle) -> bool {
    std::fs::read_to_string(handle.run_dir.join(UNPLUGGED_FILE))
        .is_ok_and(|text| text.trim() == marker(handle))
}

fn marker(handle: &VmmHandle) -> String {
    format!("{} {}", handle.pid, handle.pid_start)
}

fn mark_unplugged(handle: &VmmHandle) {
    let path = handle.run_dir.join(UNPLUGGED_FILE);
    if let Err(e) = std::fs::write(&path, marker(handle) + "\n") {
        tracing::warn!(path = %path.display(), error = %e, "cannot mark the VMM as having had a vCPU removed");
    }
}

/// One CPU slot as `query-hotpluggable-cpus` lists it.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    /// The CPU device type to plug (`qemu64-x86_64-cpu`).
    driver: String,
    /// The slot's topology properties (`socket-id`, `core-id`, `thread-id`, ...).
    props: Map<String, Value>,
    /// The plugged CPU's QOM path; `None` for a free slot.
    qom_path: Option<String>,
}

impl Slot {
    /// The slot's place in the topology, for ordering: socket, die, core, thread.
    fn position(&self) -> [u64; 4] {
        ["socket-id", "die-id", "core-id", "thread-id"]
            .map(|key| self.props.get(key).and_then(Value::as_u64).unwrap_or(0))
    }

    /// The device id a hotplugged CPU in this slot gets.
    fn device_id(&self) -> String {
        let [socket, die, core, thread] = self.position();
        format!("vmkit-cpu-{socket}-{die}-{core}-{thread}")
    }
}

/// Parses `query-hotpluggable-cpus`, sorted by position.
fn slots(value: &Value) -> Result<Vec<Slot>, String> {
    let list = value
        .as_array()
        .ok_or_else(|| format!("query-hotpluggable-cpus returned {value}"))?;
    let mut slots = list
        .iter()
        .map(|entry| {
            let driver = entry["type"].as_str();
            let props = entry["props"].as_object();
            match (driver, props) {
                (Some(driver), Some(props)) => Ok(Slot {
                    driver: driver.to_owned(),
                    props: props.clone(),
                    qom_path: entry["qom-path"].as_str().map(str::to_owned),
                }),
                _ => Err(format!("query-hotpluggable-cpus entry {entry}")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    slots.sort_by_key(Slot::position);
    Ok(slots)
}

/// What to do to go from the plugged slots in `slots` to `target` plugged CPUs:
/// the free slots to plug (lowest first), or the plugged ones to unplug (highest
/// first, never the first CPU).
fn plan(slots: &[Slot], target: u32) -> Result<(Vec<&Slot>, Vec<&Slot>), String> {
    let max = slots.len();
    let target = usize::try_from(target).unwrap_or(usize::MAX);
    if target == 0 || target > max {
        return Err(format!(
            "{target} vCPUs: this VM takes 1 to {max} while it runs (its maximum was set \
             when it started; stop it, resize, start it for more)"
        ));
    }
    let plugged: Vec<&Slot> = slots.iter().filter(|s| s.qom_path.is_some()).collect();
    let free: Vec<&Slot> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
    if target >= plugged.len() {
        Ok((free[..target - plugged.len()].to_vec(), Vec::new()))
    } else {
        let remove = plugged.len() - target;
        // `target >= 1`, so the first CPU is never among the last `remove`.
        Ok((
            Vec::new(),
            plugged.iter().rev().take(remove).copied().collect(),
        ))
    }
}

impl Qemu {
    /// Plugs or unplugs vCPUs until `target` are plugged. See the module docs.
    pub(super) async fn resize_vcpus(
        &self,
        handle: &VmmHandle,
        target: u32,
    ) -> Result<(), HypervisorError> {
        let mut qmp = self.qmp(handle, OP).await?;
        let listed = self.list_slots(handle, &mut qmp).await?;
        let (plug, unplug) = plan(&listed, target).map_err(HypervisorError::InvalidConfig)?;
        if !plug.is_empty() && self.accel().await == Accel::Tcg && has_unplugged(handle) {
            return Err(HypervisorError::Refused {
                operation: "add vCPUs to",
                message: "under software emulation (TCG) QEMU cannot add a vCPU to a VMM that \
                          has had one removed (it would crash); stop the VM, resize it, start it"
                    .to_owned(),
            });
        }
        for slot in plug {
            let mut arguments = slot.props.clone();
            arguments.insert("driver".into(), json!(slot.driver));
            arguments.insert("id".into(), json!(slot.device_id()));
            self.exec(
                handle,
                &mut qmp,
                OP,
                "device_add",
                Some(Value::Object(arguments)),
            )
            .await?;
        }
        if unplug.is_empty() {
            return Ok(());
        }
        let status = self.run_status(handle, &mut qmp, OP).await?;
        if status != "running" {
            return Err(HypervisorError::Refused {
                operation: "remove vCPUs from",
                message: format!(
                    "the guest is {status}; it must run to release a vCPU (resume it first)"
                ),
            });
        }
        let paths: Vec<String> = unplug.iter().filter_map(|s| s.qom_path.clone()).collect();
        // Marked before the first request: from then on the VMM counts as having had
        // a vCPU removed, whether or not the guest completes it.
        mark_unplugged(handle);
        for path in &paths {
            self.exec(
                handle,
                &mut qmp,
                OP,
                "device_del",
                Some(json!({ "id": path })),
            )
            .await?;
        }
        // The guest ejects each CPU once it has taken it offline.
        let started = tokio::time::Instant::now();
        let deadline = started + EJECT_TIMEOUT.max(self.config.qmp_timeout);
        let mut asked = started;
        loop {
            let listed = self.list_slots(handle, &mut qmp).await?;
            let left: Vec<&String> = listed
                .iter()
                .filter_map(|s| s.qom_path.as_ref())
                .filter(|p| paths.contains(p))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now.duration_since(asked) >= EJECT_RETRY {
                for path in &left {
                    // Asking again while an unplug is pending is accepted; a CPU
                    // that went meanwhile is not found, which is what was wanted.
                    let _ = qmp.execute("device_del", Some(json!({ "id": path }))).await;
                }
                asked = now;
            }
            if now >= deadline {
                return Err(HypervisorError::Refused {
                    operation: "remove vCPUs from",
                    message: format!(
                        "the guest did not release {} of {} vCPUs within {:?} (its kernel \
                         may lack CPU hot-remove, or a CPU is busy); they may still go later",
                        left.len(),
                        paths.len(),
                        deadline - started
                    ),
                });
            }
            tokio::time::sleep(EJECT_POLL).await;
        }
    }

    async fn list_slots(
        &self,
        handle: &VmmHandle,
        qmp: &mut QmpClient,
    ) -> Result<Vec<Slot>, HypervisorError> {
        let value = self
            .exec(handle, qmp, OP, "query-hotpluggable-cpus", None)
            .await?;
        slots(&value).map_err(|what| HypervisorError::Refused {
            operation: OP,
            message: format!("unexpected QMP answer: {what}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 7.2 lists for `-smp 1,maxcpus=4` on q35 (newest slot first).
    fn listed(plugged: &[u64]) -> Value {
        let entries: Vec<Value> = (0..4u64)
            .rev()
            .map(|core| {
                let mut entry = json!({
                    "props": { "core-id": core, "thread-id": 0, "node-id": 0, "socket-id": 0 },
                    "vcpus-count": 1,
                    "type": "qemu64-x86_64-cpu",
                });
                if plugged.contains(&core) {
                    entry["qom-path"] = json!(format!("/machine/cpu{core}"));
                }
                entry
            })
            .collect();
        Value::Array(entries)
    }

    fn cores(slots: &[&Slot]) -> Vec<u64> {
        slots.iter().map(|s| s.position()[2]).collect()
    }

    #[test]
    fn a_grow_plugs_the_lowest_free_slots() {
        let slots = slots(&listed(&[0])).unwrap();
        let (plug, unplug) = plan(&slots, 3).unwrap();
        assert_eq!(cores(&plug), [1, 2]);
        assert!(unplug.is_empty());
        assert_eq!(plug[0].device_id(), "vmkit-cpu-0-0-1-0");
        assert_eq!(plug[0].driver, "qemu64-x86_64-cpu");
    }

    #[test]
    fn a_shrink_unplugs_the_highest_and_never_the_first() {
        let slots = slots(&listed(&[0, 1, 2, 3])).unwrap();
        let (plug, unplug) = plan(&slots, 1).unwrap();
        assert!(plug.is_empty());
        assert_eq!(cores(&unplug), [3, 2, 1]);
        let (plug, unplug) = plan(&slots, 4).unwrap();
        assert!(plug.is_empty() && unplug.is_empty());
    }

    #[test]
    fn targets_outside_the_slots_are_refused_with_the_range() {
        let slots = slots(&listed(&[0])).unwrap();
        for target in [0, 5] {
            let err = plan(&slots, target).unwrap_err();
            assert!(err.contains("1 to 4"), "{err}");
        }
    }

    #[test]
    fn a_malformed_listing_is_an_error() {
        assert!(slots(&json!({"not": "a list"})).is_err());
        assert!(slots(&json!([{ "props": {} }])).is_err());
    }
}

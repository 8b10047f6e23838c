//! cloud-hypervisor's event monitor: what happened to a VMM, as it happened.
//!
//! cloud-hypervisor runs with `--event-monitor path=<run_dir>/events.json` and
//! appends a JSON object per event to that file (pretty-printed, separated by blank
//! lines): `{"timestamp": ..., "source": "vm", "event": "rebooting", "properties":
//! ...}`. A task per VMM reads the file as it grows and reports:
//!
//! - `vm`/`rebooting`: the guest reset (a reboot; cloud-hypervisor keeps the VMM):
//!   counted in the VMM's [`VmmEvents`](vmkit_core::VmmEvents).
//! - `guest`/`panic`: the guest's pvpanic device reported a kernel panic.
//!   cloud-hypervisor only logs it (the guest then reboots, with `panic=-1`), so the
//!   backend stops the VMM and reports [`VmmExit::Panic`].
//! - `vm`/`shutdown` not asked for by the backend: the guest powered off
//!   ([`VmmExit::PowerOff`]); asked for by the backend's `shutdown` or `kill`:
//!   [`VmmExit::Killed`]; a process that ends after neither: [`VmmExit::Crashed`].

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;
use vmkit_core::{VmmExit, VmmWatch, VmmWatchSender};

use crate::process::VmmProcess;

/// How often the events file is read.
const POLL: Duration = Duration::from_millis(100);
/// How long a VMM stopped after a panic has to go.
const PANIC_KILL_WAIT: Duration = Duration::from_secs(5);

/// One event as cloud-hypervisor writes it (the fields vmkit reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ChEvent {
    /// `vmm`, `vm`, `guest`, `virtio-device`, ...
    pub(crate) source: String,
    /// `booted`, `rebooting`, `shutdown`, `panic`, ...
    pub(crate) event: String,
}

/// Parses the complete events at the start of `bytes`; returns them and how many
/// bytes they took (an event still being written is left for later). Something
/// that is not an event is skipped up to the next blank line.
pub(crate) fn parse(bytes: &[u8]) -> (Vec<ChEvent>, usize) {
    let mut events = Vec::new();
    let mut used = 0;
    loop {
        let rest = &bytes[used..];
        let mut stream =
            serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
        match stream.next() {
            None => return (events, bytes.len()),
            Some(Ok(value)) => {
                used += stream.byte_offset();
                if let Ok(event) = serde_json::from_value::<ChEvent>(value) {
                    events.push(event);
                }
            }
            Some(Err(e)) if e.is_eof() => return (events, used),
            Some(Err(_)) => match find_blank_line(rest) {
                Some(skip) => used += skip,
                None => return (events, used),
            },
        }
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\n\n").map(|p| p + 2)
}

/// What the events of one VMM say so far.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    panicked: bool,
    shut_down: bool,
}

/// What an event asks of the watcher.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing.
    None,
    /// Count a guest reset.
    Reset,
    /// Stop the VMM: the guest panicked.
    Panic,
}

impl Seen {
    /// Takes in `event`.
    pub(crate) fn take(&mut self, event: &ChEvent) -> Action {
        match (event.source.as_str(), event.event.as_str()) {
            ("vm", "rebooting") => Action::Reset,
            ("guest", "panic") if !self.panicked => {
                self.panicked = true;
                Action::Panic
            }
            ("vm" | "vmm", "shutdown") => {
                self.shut_down = true;
                Action::None
            }
            _ => Action::None,
        }
    }

    /// Why the VMM ended, given whether the backend was stopping it.
    pub(crate) fn exit(&self, stopping: bool) -> VmmExit {
        if self.panicked {
            VmmExit::Panic
        } else if stopping {
            VmmExit::Killed
        } else if self.shut_down {
            VmmExit::PowerOff
        } else {
            VmmExit::Crashed
        }
    }
}

/// The event watch of one VMM.
#[derive(Debug)]
pub(crate) struct EventWatch {
    pub(crate) watch: VmmWatch,
    pub(crate) stopping: Arc<AtomicBool>,
}

/// Reads the events file from `offset`; returns the bytes read.
fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.take(1 << 20).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The file's state as a watcher reads it.
struct Reader {
    path: PathBuf,
    offset: u64,
    pending: Vec<u8>,
    seen: Seen,
}

impl Reader {
    /// Reads what is new and returns the actions of the complete events.
    fn poll(&mut self) -> Vec<Action> {
        match read_from(&self.path, self.offset) {
            Ok(bytes) => {
                self.offset += bytes.len() as u64;
                self.pending.extend_from_slice(&bytes);
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot read the events")
            }
        }
        let (events, used) = parse(&self.pending);
        self.pending.drain(..used);
        events.iter().map(|e| self.seen.take(e)).collect()
    }
}

/// Starts watching the events of `vmm` in `path`. What the file holds already (a
/// VMM watched again after a daemon restart) is read first: its resets are in the
/// past and not reported, a panic in it stops the VMM as a new one would.
pub(crate) fn watch(vmm: VmmProcess, path: PathBuf) -> EventWatch {
    let (sender, watch) = VmmWatch::channel();
    let stopping = Arc::new(AtomicBool::new(false));
    let mut reader = Reader {
        path,
        offset: 0,
        pending: Vec::new(),
        seen: Seen::default(),
    };
    // Resets before the watch began are not reported as new.
    let first: Vec<Action> = reader
        .poll()
        .into_iter()
        .filter(|a| *a != Action::Reset)
        .collect();
    apply(&first, &sender, &vmm);
    let flag = stopping.clone();
    tokio::spawn(async move {
        loop {
            if !vmm.is_alive() {
                // Its last words.
                let last = reader.poll();
                apply(&last, &sender, &vmm);
                sender.exit(reader.seen.exit(flag.load(Ordering::SeqCst)));
                return;
            }
            tokio::time::sleep(POLL).await;
            let actions = reader.poll();
            apply(&actions, &sender, &vmm);
        }
    });
    EventWatch { watch, stopping }
}

fn apply(actions: &[Action], sender: &VmmWatchSender, vmm: &VmmProcess) {
    for action in actions {
        match action {
            Action::None => {}
            Action::Reset => sender.reset(),
            Action::Panic => {
                tracing::warn!(pid = vmm.pid, "the guest panicked; stopping its VMM");
                if let Err(e) = vmm.kill() {
                    tracing::warn!(pid = vmm.pid, error = %e, "cannot stop the VMM of a panicked guest");
                }
                let vmm = vmm.clone();
                tokio::spawn(async move { vmm.wait_gone(PANIC_KILL_WAIT).await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What cloud-hypervisor writes: pretty JSON, blank lines between events.
    fn written(events: &[(&str, &str)]) -> String {
        events
            .iter()
            .map(|(source, event)| {
                format!(
                    "{{\n  \"timestamp\": {{\n    \"secs\": 0,\n    \"nanos\": 1\n  }},\n  \"source\": \"{source}\",\n  \"event\": \"{event}\",\n  \"properties\": null\n}}\n\n"
                )
            })
            .collect()
    }

    fn kinds(events: &[ChEvent]) -> Vec<(String, String)> {
        events
            .iter()
            .map(|e| (e.source.clone(), e.event.clone()))
            .collect()
    }

    #[test]
    fn complete_events_are_parsed_and_a_half_written_one_waits() {
        let text = written(&[("vmm", "starting"), ("vm", "booted")]);
        let (events, used) = parse(text.as_bytes());
        assert_eq!(
            kinds(&events),
            [
                ("vmm".into(), "starting".into()),
                ("vm".into(), "booted".into())
            ]
        );
        assert_eq!(used, text.len());

        let cut = text.len() - 20;
        let (events, used) = parse(&text.as_bytes()[..cut]);
        assert_eq!(events.len(), 1, "the second is not complete yet");
        let (rest, _) = parse(&text.as_bytes()[used..]);
        assert_eq!(rest.len(), 1, "and is read once complete");
    }

    #[test]
    fn garbage_is_skipped_up_to_the_next_event() {
        let text = format!("not json\n\n{}", written(&[("vm", "rebooting")]));
        let (events, _) = parse(text.as_bytes());
        assert_eq!(kinds(&events), [("vm".into(), "rebooting".into())]);
    }

    fn seen(events: &[(&str, &str)]) -> (Seen, Vec<Action>) {
        let mut seen = Seen::default();
        let (parsed, _) = parse(written(events).as_bytes());
        let actions = parsed.iter().map(|e| seen.take(e)).collect();
        (seen, actions)
    }

    #[test]
    fn a_reboot_is_a_reset_and_the_vmm_goes_on() {
        let (seen, actions) = seen(&[("vm", "rebooting"), ("vm", "rebooted"), ("vm", "booted")]);
        assert_eq!(actions, [Action::Reset, Action::None, Action::None]);
        assert_eq!(seen.exit(false), VmmExit::Crashed, "no shutdown seen");
    }

    #[test]
    fn a_power_off_a_panic_a_host_stop_and_a_crash_are_told_apart() {
        let power_off = [("vm", "shutdown"), ("vmm", "shutdown")];
        assert_eq!(seen(&power_off).0.exit(false), VmmExit::PowerOff);
        assert_eq!(seen(&power_off).0.exit(true), VmmExit::Killed);
        let (panicked, actions) = seen(&[("guest", "panic"), ("vm", "rebooting")]);
        assert_eq!(actions, [Action::Panic, Action::Reset]);
        assert_eq!(panicked.exit(true), VmmExit::Panic);
        assert_eq!(seen(&[("vm", "booted")]).0.exit(false), VmmExit::Crashed);
    }
}

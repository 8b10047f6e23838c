//! Failure injection shared by the fakes: "fail at step N", and "this operation
//! is broken (for this VM) until healed".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A counter of fallible fake calls that fails exactly one chosen call.
///
/// Share one `Faults` between all fakes of a test: every fallible call (state
/// store writes included) counts as one step, in the order the manager makes them.
/// [`Faults::fail_at`]`(n)` makes the n-th call from then on fail; calls after it
/// succeed again, so undo steps run normally. [`Faults::break_op`] breaks one
/// operation (for one VM, or for all) until [`Faults::heal`], whatever the step.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    calls: AtomicU64,
    fail_at: AtomicU64,
    crash_at: AtomicU64,
    log: Mutex<Vec<&'static str>>,
    broken: Mutex<Vec<Broken>>,
}

#[derive(Debug)]
struct Broken {
    operation: &'static str,
    vm: Option<String>,
    how: Breakage,
}

/// How an operation broken with [`Faults::break_op`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Breakage {
    /// With an error that proves nothing about the resource: a busy volume, a
    /// control socket that refuses the connection. Never "the VMM is gone".
    Error,
    /// With the backend's timeout error, after the 10 s the fakes give a call (of
    /// tokio's clock: run the test with paused time not to wait).
    Timeout,
}

/// The error a fake returns at an injected failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected failure at step {step} ({operation})")]
pub struct InjectedFault {
    /// The step number (1-based).
    pub step: u64,
    /// The fake operation that failed.
    pub operation: &'static str,
}

impl Faults {
    /// A counter that fails nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Resets the count and fails the `n`-th call from now (1-based). 0 disarms.
    pub fn fail_at(&self, n: u64) {
        self.inner.calls.store(0, Ordering::SeqCst);
        self.inner.crash_at.store(0, Ordering::SeqCst);
        self.inner.fail_at.store(n, Ordering::SeqCst);
        self.lock_log().clear();
    }

    /// Resets the count and fails the `n`-th call from now *and every call after
    /// it* (1-based), as if the process died there: undo steps fail too, so what
    /// exists afterwards is what a crash at that step leaves. [`Faults::reset`]
    /// "restarts the process".
    pub fn crash_at(&self, n: u64) {
        self.fail_at(0);
        self.inner.crash_at.store(n, Ordering::SeqCst);
    }

    /// Resets the count and fails nothing.
    pub fn reset(&self) {
        self.fail_at(0);
    }

    /// Calls counted since the last reset.
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// The operations counted since the last reset, in order.
    pub fn log(&self) -> Vec<&'static str> {
        self.lock_log().clone()
    }

    /// Counts one call of `operation`; fails it if it is the chosen one.
    pub fn check(&self, operation: &'static str) -> Result<(), InjectedFault> {
        let step = self.inner.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.lock_log().push(operation);
        let crash = self.inner.crash_at.load(Ordering::SeqCst);
        if step == self.inner.fail_at.load(Ordering::SeqCst) || (crash != 0 && step >= crash) {
            return Err(InjectedFault { step, operation });
        }
        Ok(())
    }

    /// Breaks every call of `operation` (e.g. `"hypervisor.attach"`,
    /// `"storage.delete"`) on the resources of VM `vm` (its id as text), or of every
    /// VM when `None`, until [`Faults::heal`]: it fails as `how` says. Independent of
    /// the step counting of [`Faults::fail_at`] and not reset by it.
    pub fn break_op(&self, operation: &'static str, vm: Option<&str>, how: Breakage) {
        self.lock_broken().push(Broken {
            operation,
            vm: vm.map(str::to_owned),
            how,
        });
    }

    /// Repairs every breakage of `operation`.
    pub fn heal(&self, operation: &'static str) {
        self.lock_broken().retain(|b| b.operation != operation);
    }

    /// How `operation` on a resource of VM `vm` (its id as text) is broken, if it is.
    pub fn broken(&self, operation: &'static str, vm: &str) -> Option<Breakage> {
        self.lock_broken()
            .iter()
            .find(|b| b.operation == operation && b.vm.as_deref().is_none_or(|v| v == vm))
            .map(|b| b.how)
    }

    fn lock_broken(&self) -> std::sync::MutexGuard<'_, Vec<Broken>> {
        self.inner.broken.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, Vec<&'static str>> {
        self.inner.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

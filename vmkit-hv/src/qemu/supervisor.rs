//! One supervisor task per QEMU: it owns the VMM's QMP connection.
//!
//! QEMU's monitor serves one client at a time, so every QMP command of the backend
//! goes through the supervisor of its VMM ([`QmpClient`]): the task runs them one
//! after another on its connection, and reads QEMU's events as they come, between
//! and during commands:
//!
//! - `RESET`: the guest reset (a reboot; QEMU runs without `-no-reboot`, so the
//!   same VMM boots again); counted in the VMM's [`VmmEvents`].
//! - `SHUTDOWN` (`guest`, `reason`) and `GUEST_PANICKED`: remembered, so that when
//!   the connection ends with the process, the exit has its reason: a guest
//!   power-off ([`VmmExit::PowerOff`]), a panic reported by the guest's pvpanic
//!   device ([`VmmExit::Panic`]), the host's `quit` or a signal
//!   ([`VmmExit::Killed`]). A VMM that ends without a word crashed
//!   ([`VmmExit::Crashed`]), unless the backend itself was stopping it.
//!
//! The task never blocks its callers beyond their own timeout: a request waits at
//! most [`QemuConfig::qmp_timeout`](super::QemuConfig::qmp_timeout) for its reply,
//! after which the caller gets a timeout and the task moves on (a late reply is
//! dropped); a request whose caller has given up is never sent. A VMM that stops
//! answering (SIGSTOP, a hang) thus times out its own callers and nothing else. The
//! exit is recorded only when the process is gone (checked by pid and start time);
//! a connection that breaks while QEMU lives is connected again.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use vmkit_core::{VmmExit, VmmWatch, VmmWatchSender};

use super::qmp::{Message, Qmp, QmpError, Transport};
use crate::process::VmmProcess;

/// How long a VMM whose connection broke has to finish exiting before the
/// supervisor connects again.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Pause between connection attempts to a live VMM that does not accept.
const RECONNECT: Duration = Duration::from_millis(200);

/// A command for the supervisor.
struct Request {
    command: String,
    arguments: Option<Value>,
    fd: Option<OwnedFd>,
    reply: oneshot::Sender<Result<Value, QmpError>>,
    deadline: Instant,
}

/// The handle on a VMM's supervisor task.
#[derive(Debug)]
pub(super) struct Supervisor {
    /// The VMM it supervises.
    pub(super) pid: u32,
    /// Its start time.
    pub(super) pid_start: u64,
    requests: mpsc::UnboundedSender<Request>,
    events: VmmWatch,
    /// Set when the backend stops the VMM itself.
    stopping: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
    timeout: Duration,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends QMP commands through a supervisor. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct QmpClient {
    requests: mpsc::UnboundedSender<Request>,
    timeout: Duration,
}

impl Supervisor {
    /// Starts supervising the VMM `vmm` whose QMP socket is `socket`; every
    /// command waits at most `timeout` for its reply.
    pub(super) fn spawn(
        vmm: VmmProcess,
        pid_start: u64,
        socket: PathBuf,
        timeout: Duration,
    ) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let (sender, events) = VmmWatch::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let pid = vmm.pid;
        let task = tokio::spawn(run(
            UnixConnector { socket, timeout },
            vmm,
            rx,
            sender,
            stopping.clone(),
        ));
        Self {
            pid,
            pid_start,
            requests,
            events,
            stopping,
            task: task.abort_handle(),
            timeout,
        }
    }

    /// A client for commands, each waiting at most the configured timeout for its
    /// reply.
    pub(super) fn client(&self) -> QmpClient {
        QmpClient {
            requests: self.requests.clone(),
            timeout: self.timeout,
        }
    }

    /// A subscription to the VMM's events.
    pub(super) fn watch(&self) -> VmmWatch {
        self.events.clone()
    }

    /// Records that the backend is stopping the VMM: its end is [`VmmExit::Killed`].
    pub(super) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

impl QmpClient {
    /// Runs `command` with `arguments` and returns its `return` value.
    pub(crate) async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.request(command, arguments, None).await
    }

    /// Runs `command` with `arguments`, passing a copy of `fd` along with it
    /// (`SCM_RIGHTS`), as `getfd` needs.
    pub(crate) async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let fd = fd.try_clone_to_owned().map_err(QmpError::Io)?;
        self.request(command, arguments, Some(fd)).await
    }

    async fn request(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
    ) -> Result<Value, QmpError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            command: command.to_owned(),
            arguments,
            fd,
            reply,
            deadline: Instant::now() + self.timeout,
        };
        // The task ends with the VMM.
        self.requests.send(request).map_err(|_| QmpError::Closed)?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => Err(QmpError::Timeout(self.timeout)),
        }
    }
}

/// Opens QMP sessions.
trait Connector: Send + 'static {
    /// The stream type.
    type Stream: Transport + 'static;
    /// Connects and negotiates capabilities.
    fn connect(
        &self,
    ) -> impl std::future::Future<Output = Result<Qmp<Self::Stream>, QmpError>> + Send;
}

/// Connects to a QMP Unix socket.
struct UnixConnector {
    socket: PathBuf,
    timeout: Duration,
}

impl Connector for UnixConnector {
    type Stream = tokio::net::UnixStream;

    async fn connect(&self) -> Result<Qmp<Self::Stream>, QmpError> {
        Qmp::connect(&self.socket, self.timeout).await
    }
}

/// Whether the process supervised is still there.
trait Liveness: Send + 'static {
    /// Whether it lives.
    fn is_alive(&self) -> bool;
}

impl Liveness for VmmProcess {
    fn is_alive(&self) -> bool {
        VmmProcess::is_alive(self)
    }
}

/// What QEMU said about its end before it went.
#[derive(Debug, Default)]
struct Last {
    /// `SHUTDOWN`'s `guest` and `reason`.
    shutdown: Option<(bool, String)>,
    /// A `GUEST_PANICKED` came.
    panicked: bool,
}

impl Last {
    /// Why the VMM ended, from what it said and whether the backend stopped it.
    fn exit(&self, stopping: bool) -> VmmExit {
        if self.panicked {
            return VmmExit::Panic;
        }
        if stopping {
            return VmmExit::Killed;
        }
        match &self.shutdown {
            Some((_, reason)) if reason == "guest-panic" => VmmExit::Panic,
            Some((true, reason)) if reason == "guest-reset" => VmmExit::Reboot,
            Some((true, _)) => VmmExit::PowerOff,
            Some((false, _)) => VmmExit::Killed,
            None => VmmExit::Crashed,
        }
    }

    /// Takes in an event; a reset is reported at once.
    fn event(&mut self, event: &str, data: &Value, events: &VmmWatchSender) {
        match event {
            "RESET" => {
                tracing::debug!(reason = ?data.get("reason"), "guest reset");
                events.reset();
            }
            "SHUTDOWN" => {
                let guest = data.get("guest").and_then(Value::as_bool).unwrap_or(false);
                let reason = data
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                tracing::debug!(guest, %reason, "QEMU shuts down");
                self.shutdown = Some((guest, reason));
            }
            "GUEST_PANICKED" => {
                tracing::debug!(info = %data, "the guest panicked");
                self.panicked = true;
            }
            other => tracing::trace!(event = other, "QMP event"),
        }
    }
}

/// How a connection ended.
enum Served {
    /// The backend dropped the supervisor.
    Dropped,
    /// The connection broke.
    Lost,
}

/// The supervisor task: connects, serves requests and reads events until the VMM
/// is gone (or the supervisor dropped).
async fn run<C: Connector, L: Liveness>(
    connector: C,
    vmm: L,
    mut requests: mpsc::UnboundedReceiver<Request>,
    events: VmmWatchSender,
    stopping: Arc<AtomicBool>,
) {
    let mut last = Last::default();
    let mut backlog = VecDeque::new();
    loop {
        match connector.connect().await {
            Ok(mut qmp) => {
                let served = serve(&mut qmp, &mut requests, &mut backlog, &events, &mut last).await;
                if let Served::Dropped = served {
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot connect to QMP"),
        }
        // Closed, or never connected: QEMU is exiting, or does not answer.
        let deadline = Instant::now() + EXIT_GRACE;
        while vmm.is_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !vmm.is_alive() {
            events.exit(last.exit(stopping.load(Ordering::SeqCst)));
            return;
        }
        // Requests of callers who gave up are not sent later.
        keep_live(&mut requests, &mut backlog);
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Keeps the queued requests whose caller still waits, in order.
fn keep_live(requests: &mut mpsc::UnboundedReceiver<Request>, backlog: &mut VecDeque<Request>) {
    while let Ok(request) = requests.try_recv() {
        backlog.push_back(request);
    }
    backlog.retain(|r| !r.reply.is_closed() && Instant::now() < r.deadline);
}

/// Serves `requests` on `qmp` and reads its events until the connection ends.
async fn serve<S: Transport>(
    qmp: &mut Qmp<S>,
    requests: &mut mpsc::UnboundedReceiver<Request>,
    backlog: &mut VecDeque<Request>,
    events: &VmmWatchSender,
    last: &mut Last,
) -> Served {
    loop {
        let queued = backlog.pop_front();
        let request = if let Some(request) = queued {
            request
        } else {
            tokio::select! {
            request = requests.recv() => match request {
                Some(request) => request,
                None => return Served::Dropped,
            },
            message = qmp.next_message() => match message {
                Ok(Message::Event { event, data }) => {
                    last.event(&event, &data, events);
                    continue;
                }
                // The late reply to a request whose caller gave up.
                Ok(Message::Reply { .. }) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "QMP connection ended");
                    return Served::Lost;
                }
            },
            }
        };
        if request.reply.is_closed() || Instant::now() >= request.deadline {
            continue;
        }
        let sent = tokio::time::timeout_at(
            request.deadline,
            qmp.send(
                &request.command,
                request.arguments.clone(),
                request.fd.as_ref().map(AsFd::as_fd),
            ),
        )
        .await;
        let id = match sent {
            Ok(Ok(id)) => id,
            // The connection broke before QEMU had the whole command, so it did not
            // run it (QEMU drops a partial line with its connection): it goes out
            // again on the next connection.
            Ok(Err(_)) => {
                backlog.push_front(request);
                return Served::Lost;
            }
            // A write that cannot finish leaves the connection mid-message.
            Err(_) => return Served::Lost,
        };
        let Request {
            fd,
            reply,
            deadline,
            ..
        } = request;
        drop(fd);
        loop {
            let message = tokio::select! {
                message = qmp.next_message() => message,
                _ = tokio::time::sleep_until(deadline) => {
                    // The caller has timed out; its reply will be dropped.
                    break;
                }
            };
            match message {
                Ok(Message::Event { event, data }) => last.event(&event, &data, events),
                Ok(Message::Reply { id: got, result }) if got == id => {
                    let _ = reply.send(result);
                    break;
                }
                Ok(Message::Reply { .. }) => {}
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return Served::Lost;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}"#;

    /// Hands out the host ends of in-memory connections, one per connect.
    struct Duplexes(Mutex<Vec<DuplexStream>>);

    impl Connector for Arc<Duplexes> {
        type Stream = DuplexStream;

        async fn connect(&self) -> Result<Qmp<DuplexStream>, QmpError> {
            let stream = self.0.lock().unwrap().pop();
            match stream {
                Some(stream) => Qmp::handshake(stream, Duration::from_secs(5)).await,
                None => Err(QmpError::Connect(std::io::ErrorKind::NotFound.into())),
            }
        }
    }

    /// A process that lives until told otherwise.
    #[derive(Clone, Default)]
    struct Alive(Arc<AtomicBool>);

    impl Liveness for Alive {
        fn is_alive(&self) -> bool {
            !self.0.load(Ordering::SeqCst)
        }
    }

    impl Alive {
        fn end(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A scripted QEMU on the other end: answers `qmp_capabilities`, then runs `f`
    /// with the lines it reads and its writer.
    struct FakeQemu {
        lines: tokio::io::Lines<BufReader<tokio::io::ReadHalf<DuplexStream>>>,
        writer: tokio::io::WriteHalf<DuplexStream>,
    }

    impl FakeQemu {
        async fn new(stream: DuplexStream) -> Self {
            let (r, w) = tokio::io::split(stream);
            let mut qemu = Self {
                lines: BufReader::new(r).lines(),
                writer: w,
            };
            qemu.say(GREETING).await;
            let request = qemu.request().await;
            assert_eq!(request["execute"], "qmp_capabilities");
            qemu.reply(&request, r#"{}"#).await;
            qemu
        }

        async fn say(&mut self, line: &str) {
            self.writer
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .unwrap();
        }

        async fn request(&mut self) -> Value {
            let line = self.lines.next_line().await.unwrap().unwrap();
            serde_json::from_str(&line).unwrap()
        }

        async fn reply(&mut self, request: &Value, value: &str) {
            let line = format!(r#"{{"return": {value}, "id": {}}}"#, request["id"]);
            self.say(&line).await;
        }
    }

    struct Harness {
        client: QmpClient,
        events: VmmWatch,
        alive: Alive,
        stopping: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<()>,
    }

    fn supervise(streams: Vec<DuplexStream>, timeout: Duration) -> Harness {
        let (requests, rx) = mpsc::unbounded_channel();
        let (sender, events) = VmmWatch::channel();
        let alive = Alive::default();
        let stopping = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(
            Arc::new(Duplexes(Mutex::new(streams))),
            alive.clone(),
            rx,
            sender,
            stopping.clone(),
        ));
        Harness {
            client: QmpClient { requests, timeout },
            events,
            alive,
            stopping,
            task,
        }
    }

    const SHUTDOWN_POWEROFF: &str = r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;
    const RESET: &str = r#"{"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;
    const PANICKED: &str = r#"{"event": "GUEST_PANICKED", "data": {"action": "pause", "info": {"type": "hyper-v"}}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;
    const SHUTDOWN_PANIC: &str = r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-panic"}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;
    const SHUTDOWN_QUIT: &str = r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": {"seconds": 1, "microseconds": 0}}"#;

    #[tokio::test]
    async fn commands_are_answered_and_a_reset_between_them_is_counted() {
        let (host, qemu) = tokio::io::duplex(4096);
        let h = supervise(vec![host], Duration::from_secs(5));
        let mut events = h.events.clone();
        let server = tokio::spawn(async move {
            let mut q = FakeQemu::new(qemu).await;
            let r = q.request().await;
            assert_eq!(r["execute"], "query-status");
            q.say(RESET).await;
            q.reply(&r, r#"{"status": "running"}"#).await;
            q.say(RESET).await;
            q
        });
        let status = h.client.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "running");
        let _q = server.await.unwrap();
        while events.current().resets < 2 {
            events.changed().await.unwrap();
        }
        assert_eq!(events.current().exit, None);
    }

    #[tokio::test]
    async fn a_guest_power_off_panic_and_quit_are_told_apart() {
        for (said, stopping, expected) in [
            (vec![SHUTDOWN_POWEROFF], false, VmmExit::PowerOff),
            (vec![PANICKED, SHUTDOWN_PANIC], false, VmmExit::Panic),
            (vec![SHUTDOWN_QUIT], false, VmmExit::Killed),
            (vec![], false, VmmExit::Crashed),
            (vec![SHUTDOWN_POWEROFF], true, VmmExit::Killed),
        ] {
            let (host, qemu) = tokio::io::duplex(4096);
            let mut h = supervise(vec![host], Duration::from_secs(5));
            h.stopping.store(stopping, Ordering::SeqCst);
            let mut q = FakeQemu::new(qemu).await;
            for line in said {
                q.say(line).await;
            }
            h.alive.end();
            drop(q);
            assert_eq!(h.events.wait_exit().await, Some(expected));
            h.task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out_its_caller_and_a_late_reply_is_dropped() {
        let (host, qemu) = tokio::io::duplex(4096);
        let h = supervise(vec![host], Duration::from_millis(300));
        let (go, wait) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut q = FakeQemu::new(qemu).await;
            let first = q.request().await;
            wait.await.unwrap();
            // Too late for the first caller.
            q.reply(&first, r#""late""#).await;
            let second = q.request().await;
            q.reply(&second, r#""second""#).await;
            q
        });
        let err = h.client.execute("stop", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)), "{err:?}");
        go.send(()).unwrap();
        let second = h.client.execute("query-status", None).await.unwrap();
        assert_eq!(
            second, "second",
            "the late reply is not taken for the next one"
        );
        let _q = server.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_whose_caller_gave_up_is_never_sent() {
        let (host, qemu) = tokio::io::duplex(4096);
        let h = supervise(vec![host], Duration::from_millis(200));
        // The VMM has not even greeted: the caller gives up.
        let err = h.client.execute("cont", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Timeout(_)), "{err:?}");
        let mut client = h.client.clone();
        client.timeout = Duration::from_secs(5);
        let server = tokio::spawn(async move {
            let mut q = FakeQemu::new(qemu).await;
            let r = q.request().await;
            q.reply(&r, r#"{}"#).await;
            r
        });
        client.execute("query-status", None).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(
            seen["execute"], "query-status",
            "the stale `cont` was dropped"
        );
    }

    #[tokio::test]
    async fn a_broken_connection_to_a_live_vmm_is_made_again() {
        let (first, qemu1) = tokio::io::duplex(4096);
        let (second, qemu2) = tokio::io::duplex(4096);
        // Popped from the end: `first` is used first.
        let h = supervise(vec![second, first], Duration::from_secs(5));
        let q1 = FakeQemu::new(qemu1).await;
        drop(q1);
        let server = tokio::spawn(async move {
            let mut q = FakeQemu::new(qemu2).await;
            let r = q.request().await;
            q.reply(&r, r#""again""#).await;
            q
        });
        let value = h.client.execute("query-status", None).await.unwrap();
        assert_eq!(value, "again");
        assert_eq!(h.events.current().exit, None, "a live VMM has not ended");
        let _q = server.await.unwrap();
    }
}

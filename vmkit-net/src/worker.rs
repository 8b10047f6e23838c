//! A dedicated thread that lives in the target network namespace.
//!
//! Network namespaces belong to threads: a netlink socket, a `/dev/net/tun` file, a
//! `/proc/sys/net` file and a child process (`nft`) all take the namespace of the
//! thread that creates them. So every host operation runs as a job on one thread
//! that entered the namespace once (`setns`) and owns its netlink connection. Jobs
//! run one at a time, which also serialises changes to links and rules.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};
use vmkit_core::NetworkError;

use crate::error::{io_error, request};

/// What a job gets to work with.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// rtnetlink handle whose socket lives in the namespace.
    pub netlink: rtnetlink::Handle,
}

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type Job = Box<dyn FnOnce(Ctx) -> LocalFuture + Send>;

/// The handle to the namespace thread; the thread ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Worker {
    /// Starts the thread, in `netns` if given, and waits until its netlink
    /// connection is open.
    pub fn spawn(netns: Option<&Path>) -> Result<Self, NetworkError> {
        let (jobs, rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.map(Path::to_path_buf);
        std::thread::Builder::new()
            .name("vmkit-net".to_owned())
            .spawn(move || run(netns, rx, ready_tx))
            .map_err(|e| io_error("starting the network thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(stopped()),
        }
    }

    /// Runs `f` on the namespace thread and returns its result.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, NetworkError>
    where
        F: FnOnce(Ctx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, NetworkError>> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            Box::pin(async move {
                let _ = tx.send(f(ctx).await);
            })
        });
        self.jobs.send(job).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> NetworkError {
    request(
        "running a network job",
        "the vmkit-net thread stopped (a job panicked)",
    )
}

fn run(
    netns: Option<PathBuf>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ready: std::sync::mpsc::Sender<Result<(), NetworkError>>,
) {
    let runtime = match enter(netns.as_deref()).and_then(|()| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io_error("starting the network thread's runtime", e))
    }) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async move {
        let (connection, netlink, _) = match rtnetlink::new_connection() {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(io_error("opening a netlink socket", e)));
                return;
            }
        };
        tokio::spawn(connection);
        if ready.send(Ok(())).is_err() {
            return;
        }
        let ctx = Ctx { netlink };
        while let Some(job) = jobs.recv().await {
            job(ctx.clone()).await;
        }
    });
}

/// Moves the calling thread into the network namespace bound at `path`.
fn enter(path: Option<&Path>) -> Result<(), NetworkError> {
    let Some(path) = path else {
        return Ok(());
    };
    let file = std::fs::File::open(path)
        .map_err(|e| io_error(format!("opening network namespace {}", path.display()), e))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        if e == nix::errno::Errno::EPERM {
            NetworkError::Permission(format!("entering network namespace {}", path.display()))
        } else {
            io_error(
                format!("entering network namespace {}", path.display()),
                std::io::Error::from(e),
            )
        }
    })
}

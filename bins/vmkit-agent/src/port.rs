//! A virtio-serial port (or any pollable character device) as an async byte stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where udev links named virtio-serial ports.
const NAMED_PORTS: &str = "/dev/virtio-ports";
/// Where the kernel lists virtio-serial ports with their names.
const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// Finds the device of the virtio-serial port `name`, or takes `name` as a path when it
/// starts with `/`.
///
/// Tiny images have no udev and so no `/dev/virtio-ports` links; the port's name is then
/// looked up in sysfs and its `/dev/vportNpM` node (from devtmpfs) used.
pub fn find(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        let path = PathBuf::from(name);
        return path.exists().then_some(path);
    }
    let link = Path::new(NAMED_PORTS).join(name);
    if link.exists() {
        return Some(link);
    }
    let entries = std::fs::read_dir(SYSFS_PORTS).ok()?;
    entries.flatten().find_map(|entry| {
        let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        let device = Path::new("/dev").join(entry.file_name());
        (port_name.trim() == name && device.exists()).then_some(device)
    })
}

/// An open port. Clones share the descriptor, so one can be handed to each session.
#[derive(Clone, Debug)]
pub struct Port {
    fd: Arc<AsyncFd<File>>,
}

impl Port {
    /// Opens the device read/write and non-blocking.
    pub fn open(path: &Path) -> io::Result<Port> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        Port::from_file(file)
    }

    /// Wraps an already open, non-blocking descriptor.
    pub fn from_file(file: File) -> io::Result<Port> {
        // SAFETY: a `File` owns its descriptor and keeps it open, unchanged, until it is
        // dropped, which happens only when the `AsyncFd` that owns it is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
        Ok(Port { fd: Arc::new(fd) })
    }

    /// Reads and drops whatever is queued now, to resynchronise after a broken frame.
    pub fn discard_pending(&self) {
        let mut buf = [0u8; 4096];
        let mut file: &File = self.fd.get_ref();
        // Stop at WouldBlock, end of stream or any error; bound the work in any case.
        for _ in 0..1024 {
            match file.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                let mut file: &File = fd.get_ref();
                file.read(unfilled)
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| {
                let mut file: &File = fd.get_ref();
                file.write(data)
            }) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use vmkit_guest::{Client, ClientConfig, ExecRequest, ServerConfig, SystemHandler, serve};

    use super::*;

    /// One end of a socket pair stands in for the character device.
    fn port_pair() -> (Port, tokio::net::UnixStream) {
        let (guest, host) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        host.set_nonblocking(true).expect("nonblocking");
        let port = Port::from_file(File::from(OwnedFd::from(guest))).expect("port");
        let host = tokio::net::UnixStream::from_std(host).expect("host stream");
        (port, host)
    }

    #[tokio::test]
    async fn agent_serves_exec_over_a_port() {
        let (port, host) = port_pair();
        tokio::spawn(serve(
            port,
            Arc::new(SystemHandler::new()),
            ServerConfig::default(),
        ));
        let client = Client::new(host, ClientConfig::default());

        let output = client
            .exec_collect(
                ExecRequest::new(["sh", "-c", "echo out; echo err >&2"]),
                1024,
            )
            .await
            .expect("exec");

        assert_eq!(output.stdout, b"out\n");
        assert_eq!(output.stderr, b"err\n");
        assert!(output.status.success());
    }

    #[tokio::test]
    async fn port_reports_end_of_stream_when_the_host_hangs_up() {
        let (port, host) = port_pair();
        drop(host);

        let served = serve(
            port,
            Arc::new(SystemHandler::new()),
            ServerConfig::default(),
        )
        .await;

        assert!(served.is_ok());
    }

    #[test]
    fn absolute_names_are_taken_as_paths() {
        assert_eq!(find("/dev/null"), Some(PathBuf::from("/dev/null")));
        assert_eq!(find("/nonexistent/port"), None);
    }
}

//! dnsmasq (Debian `dnsmasq-base`) on 127.0.0.1 for a test: a real name server that
//! publishes the records a test gives it (`--txt-record`, `--cname`,
//! `--host-record`) and nothing else. Used by vmkit-net's resolver test and the
//! daemon's custom-domain tests (included by path); each uses part of it.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// dnsmasq on `127.0.0.1:port` (UDP and TCP); killed on drop.
pub struct Dnsmasq {
    child: Child,
    /// The port it answers on.
    pub port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq answering only from `records` (dnsmasq options such as
    /// `--txt-record=NAME,VALUE`); no upstream, no hosts file, no DHCP.
    pub fn start(records: &[String]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port, records)
    }

    /// As [`Dnsmasq::start`], on `port` (where an earlier one, now dropped, was).
    pub fn start_on(port: u16, records: &[String]) -> Self {
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file=",
                "--log-facility=-",
            ])
            .arg(format!("--port={port}"))
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq runs (scripts/install-deps.sh installs dnsmasq-base)");
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("dnsmasq exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "dnsmasq did not listen in 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

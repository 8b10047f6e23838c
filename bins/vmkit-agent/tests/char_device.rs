//! The agent binary serving over a character device, as it does on a virtio-serial port.
//! A raw-mode pseudo-terminal stands in for the port.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};

use nix::pty::openpty;
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use vmkit_guest::{Client, ClientConfig, ExecRequest};

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn agent_binary_answers_over_a_character_device() {
    let pty = openpty(None, None).unwrap();
    let mut termios = tcgetattr(&pty.slave).unwrap();
    cfmakeraw(&mut termios);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &termios).unwrap();
    let device = nix::unistd::ttyname(&pty.slave).unwrap();
    let _agent = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_vmkit-agent"))
            .arg("--transport")
            .arg(format!("virtio-serial:{}", device.display()))
            // On the host, the agent must not touch the host's CPUs.
            .arg("--no-hotplug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Copy between the pty's host side and a socket the client can use.
    let (host, bridge) = UnixStream::pair().unwrap();
    let (mut master_in, mut master_out) = {
        let master = File::from(pty.master);
        (master.try_clone().unwrap(), master)
    };
    let (mut bridge_in, mut bridge_out) = (bridge.try_clone().unwrap(), bridge);
    std::thread::spawn(move || std::io::copy(&mut master_in, &mut bridge_out));
    std::thread::spawn(move || std::io::copy(&mut bridge_in, &mut master_out));
    host.set_nonblocking(true).unwrap();
    let client = Client::new(
        tokio::net::UnixStream::from_std(host).unwrap(),
        ClientConfig::default(),
    );

    let info = client.hello().await.unwrap();
    let output = client
        .exec_collect(
            ExecRequest::new(["sh", "-c", "head -c 100000 /dev/zero | wc -c; echo err >&2"]),
            1024,
        )
        .await
        .unwrap();

    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(output.stdout, b"100000\n");
    assert_eq!(output.stderr, b"err\n");
    assert!(output.status.success());
    drop(pty.slave);
}

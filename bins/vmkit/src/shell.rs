//! `vmkit vm shell NAME [-- CMD...]`: an interactive session in a VM through its
//! agent, over the daemon's session route (`vmkit_core::api::session`). With a
//! terminal on both ends (the default when standard input is one) the guest gets a
//! pty of this terminal's size, this terminal goes raw for the session and is put
//! back after, and window changes follow; without, standard input is piped to the
//! command and its end closes the command's input.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmkit_core::api::session::{ClientFrame, SESSION_HEADER, SESSION_PROTOCOL, ServerFrame};
use vmkit_core::guest::SessionRequest;

use crate::client::Api;

/// What `vm shell` was asked.
pub struct ShellArgs {
    pub name: String,
    pub user: Option<String>,
    pub tty: Option<bool>,
    pub env: Vec<(String, String)>,
    pub command: Vec<String>,
}

/// The terminal's size (columns, rows), when standard output is a terminal.
fn window_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` into the pointer it is given.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// Standard input in raw mode until dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> anyhow::Result<Self> {
        // SAFETY: `termios` is plain data that tcgetattr fills in.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: a valid fd and a pointer to a termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the terminal's mode");
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: a valid fd and a termios from tcgetattr.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error()).context("making the terminal raw");
        }
        Ok(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: puts back the mode read at `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

pub async fn shell(api: &Api, args: ShellArgs) -> anyhow::Result<ExitCode> {
    let tty = args
        .tty
        .unwrap_or_else(|| std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
    let mut request = SessionRequest::new(args.command);
    if let Some(user) = args.user {
        request = request.user(user);
    }
    for (key, value) in args.env {
        request = request.env(key, value);
    }
    if tty {
        let (cols, rows) = window_size().unwrap_or((80, 24));
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".to_owned());
        request = request.pty(term, cols, rows);
    }
    let header = serde_json::to_string(&request).context("encoding the session request")?;
    let path = format!(
        "/v1/vms/{}/session",
        crate::client::path_segment(&args.name)
    );
    let connection = api
        .upgrade(&path, SESSION_PROTOCOL, &[(SESSION_HEADER, header)])
        .await?;
    let (mut reader, writer) = tokio::io::split(TokioIo::new(connection));
    let writer = std::sync::Arc::new(tokio::sync::Mutex::new(writer));
    let raw = match tty && std::io::stdin().is_terminal() {
        true => Some(RawTerminal::enter()?),
        false => None,
    };

    // Input: standard input, then its end; window changes.
    let input = {
        let writer = writer.clone();
        async move {
            let mut stdin = tokio::io::stdin();
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let frame = match stdin.read(&mut buffer).await {
                    Ok(0) | Err(_) => ClientFrame::CloseStdin,
                    Ok(n) => ClientFrame::Stdin(buffer[..n].to_vec()),
                };
                let last = frame == ClientFrame::CloseStdin;
                if writer
                    .lock()
                    .await
                    .write_all(&frame.encode())
                    .await
                    .is_err()
                    || last
                {
                    break;
                }
            }
            // The output goes on until the command ends.
            std::future::pending::<()>().await;
        }
    };
    let resizes = {
        let writer = writer.clone();
        async move {
            let Ok(mut changes) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return std::future::pending::<()>().await;
            };
            while changes.recv().await.is_some() {
                if let Some((cols, rows)) = window_size() {
                    let frame = ClientFrame::Resize { cols, rows };
                    if writer
                        .lock()
                        .await
                        .write_all(&frame.encode())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            std::future::pending::<()>().await;
        }
    };
    let output = async {
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        loop {
            match ServerFrame::read(&mut reader).await {
                Ok(Some(ServerFrame::Stdout(data))) => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Ok(Some(ServerFrame::Stderr(data))) => {
                    stderr.write_all(&data)?;
                    stderr.flush()?;
                }
                Ok(Some(ServerFrame::Exit(status))) => {
                    let code = match (status.code, status.signal) {
                        (_, Some(signal)) => 128 + signal,
                        (Some(code), None) => code,
                        (None, None) => 1,
                    };
                    return Ok(ExitCode::from(code.clamp(0, 255) as u8));
                }
                Ok(Some(ServerFrame::Error(message))) => anyhow::bail!("{message}"),
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("the daemon closed the session before it ended"),
                Err(e) => return Err(e).context("reading the session"),
            }
        }
    };
    let result = tokio::select! {
        result = output => result,
        () = input => unreachable!("input waits forever once done"),
        () = resizes => unreachable!("resizes wait forever"),
    };
    drop(raw);
    if tty && result.is_ok() {
        // The guest's last line may not end with one; the shell prompt comes after.
        eprint!("\r");
    }
    result
}

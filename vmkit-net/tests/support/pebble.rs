//! pebble, the ACME test CA (Debian `pebble`), on 127.0.0.1 for a test: its own
//! HTTPS certificate from a local CA, `-dnsserver` pointed where the test says. Used
//! by vmkit-net's ACME test and the daemon's (included by path).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use vmkit_net::https::tls::LocalCa;

/// A port of 127.0.0.1 free now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// pebble on 127.0.0.1 with a TLS certificate from a local CA; killed on drop.
pub struct Pebble {
    /// Killed when dropped (`kill_on_drop`).
    _child: tokio::process::Child,
    acme_port: u16,
    /// Its management interface (`/roots/0`: the root it signs with).
    pub management_port: u16,
    /// The CA of pebble's own HTTPS certificate.
    pub tls_root: PathBuf,
}

impl Pebble {
    /// Starts pebble, asking `127.0.0.1:dns_port` for every name and validating
    /// HTTP-01 at port `http_port`; keeps its files in `dir`.
    pub async fn start(dir: &Path, dns_port: u16, http_port: u16) -> Self {
        let ca = LocalCa::load_or_create(dir).unwrap();
        let tls = ca.issue(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        std::fs::write(dir.join("pebble.crt"), &tls.chain_pem).unwrap();
        std::fs::write(dir.join("pebble.key"), &tls.key_pem).unwrap();
        let (acme_port, management_port) = (free_port(), free_port());
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.join("pebble.crt"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("pebble.log")).unwrap();
        let child = tokio::process::Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting pebble failed ({e}); run scripts/install-deps.sh (package pebble)")
            });
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", acme_port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            _child: child,
            acme_port,
            management_port,
            tls_root: ca.certificate_path().to_owned(),
        }
    }

    /// Its ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }
}

//! The HTTPS edge (feature `https`): `https://NAME.domain` reaches the web server in
//! a VM.

pub mod acme;
pub mod tls;

/// Errors of the HTTPS edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    /// Making, reading or using a certificate failed.
    #[error("{what}")]
    Certificate {
        /// What went wrong.
        what: String,
    },
    /// Reading or writing a file, or a listener, failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

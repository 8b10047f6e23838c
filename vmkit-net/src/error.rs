//! Mapping of netlink, ioctl and nft failures onto [`NetworkError`].

use vmkit_core::NetworkError;

pub(crate) fn request(operation: impl Into<String>, message: impl Into<String>) -> NetworkError {
    NetworkError::Request {
        operation: operation.into(),
        message: message.into(),
    }
}

pub(crate) fn io_error(context: impl Into<String>, source: std::io::Error) -> NetworkError {
    let context = context.into();
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => NetworkError::Permission(context),
        _ => NetworkError::Io { context, source },
    }
}

/// The errno of a netlink error reply, if it is one.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

pub(crate) fn netlink(operation: impl Into<String>, e: rtnetlink::Error) -> NetworkError {
    let operation = operation.into();
    match netlink_errno(&e) {
        Some(libc::EPERM) | Some(libc::EACCES) => NetworkError::Permission(operation),
        Some(errno) => request(
            operation,
            std::io::Error::from_raw_os_error(errno).to_string(),
        ),
        None => request(operation, e.to_string()),
    }
}

pub(crate) fn nft(
    operation: impl Into<String>,
    e: nftables::helper::NftablesError,
) -> NetworkError {
    use nftables::helper::NftablesError as E;
    let operation = operation.into();
    match e {
        E::NftExecution { inner, .. } if inner.kind() == std::io::ErrorKind::NotFound => request(
            operation,
            "the `nft` program is not installed (Debian: apt-get install nftables)",
        ),
        E::NftExecution { inner, .. } => io_error(format!("{operation} (running nft)"), inner),
        E::NftFailed { stderr, .. }
            if stderr.contains("Operation not permitted")
                || stderr.contains("Permission denied") =>
        {
            NetworkError::Permission(operation)
        }
        E::NftFailed { stderr, stdout, .. } => {
            let text = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            request(operation, text.trim().to_owned())
        }
        other => request(operation, other.to_string()),
    }
}

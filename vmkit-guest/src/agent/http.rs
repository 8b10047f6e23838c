//! A plain HTTP/1.1 GET, enough to fetch an upgrade from a URL the host serves. No TLS,
//! no redirects, no chunked responses: the host serves the file with a `Content-Length`
//! (or closes the connection at its end).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may stay silent.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes of status line and headers accepted.
const MAX_HEAD: usize = 16 << 10;

/// A URL split into what the request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Url {
    /// `host` or `host:port`, for the `Host` header.
    authority: String,
    host: String,
    port: u16,
    /// The path and query, starting with `/`.
    target: String,
}

/// Parses an `http://host[:port][/path]` URL.
pub(super) fn parse_url(url: &str) -> Result<Url, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("`{url}` is not an http:// URL (the agent fetches plain HTTP only)")
    })?;
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{url}` contains spaces or control characters"));
    }
    let (authority, target) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    let target = target.split('#').next().unwrap_or("/").to_owned();
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("`{url}` has no usable host"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("`{url}` has a malformed IPv6 host"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => port
                .parse()
                .map_err(|_| format!("`{url}` has a bad port"))?,
            None if after.is_empty() => 80,
            None => return Err(format!("`{url}` has a malformed host")),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (
                host.to_owned(),
                port.parse()
                    .map_err(|_| format!("`{url}` has a bad port"))?,
            ),
            None => (authority.to_owned(), 80),
        }
    };
    Ok(Url {
        authority: authority.to_owned(),
        host,
        port,
        target,
    })
}

/// The body of a response being read.
pub(super) struct Body {
    reader: BufReader<TcpStream>,
    /// Bytes still to come when the length is known.
    remaining: Option<u64>,
    limit: u64,
    read: u64,
    shown: String,
}

impl Body {
    /// Reads the next piece of the body into `buf`; 0 at its end.
    pub(super) async fn read(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let want = match self.remaining {
            Some(0) => return Ok(0),
            Some(left) => usize::try_from(left).unwrap_or(usize::MAX).min(buf.len()),
            None => buf.len(),
        };
        let n = tokio::time::timeout(IDLE_TIMEOUT, self.reader.read(&mut buf[..want]))
            .await
            .map_err(|_| format!("{} stalled", self.shown))?
            .map_err(|err| format!("reading {} failed: {err}", self.shown))?;
        if n == 0 {
            return match self.remaining {
                Some(left) => Err(format!(
                    "{} ended {left} bytes before its Content-Length",
                    self.shown
                )),
                None => Ok(0),
            };
        }
        self.read += n as u64;
        if self.read > self.limit {
            return Err(format!(
                "{} is larger than the limit of {} bytes",
                self.shown, self.limit
            ));
        }
        if let Some(left) = &mut self.remaining {
            *left -= n as u64;
        }
        Ok(n)
    }
}

/// Sends `GET url` and reads the response head; the body of a `200` response is left to
/// read. Refuses bodies announced larger than `limit`.
pub(super) async fn get(url: &str, limit: u64) -> Result<Body, String> {
    let parsed = parse_url(url)?;
    let connect = TcpStream::connect((parsed.host.as_str(), parsed.port));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| format!("connecting to {} timed out", parsed.authority))?
        .map_err(|err| format!("cannot connect to {}: {err}", parsed.authority))?;
    let mut reader = BufReader::new(stream);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vmkit-agent/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        parsed.target,
        parsed.authority,
        env!("CARGO_PKG_VERSION")
    );
    reader
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("sending the request to {} failed: {err}", parsed.authority))?;

    let mut head = Vec::new();
    let mut lines = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = tokio::time::timeout(
            IDLE_TIMEOUT,
            (&mut reader)
                .take((MAX_HEAD - head.len().min(MAX_HEAD)) as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await
        .map_err(|_| format!("{url} did not answer"))?
        .map_err(|err| format!("reading the answer of {url} failed: {err}"))?;
        head.extend_from_slice(&line);
        if n == 0 || head.len() > MAX_HEAD {
            return Err(format!("{url} sent no valid HTTP response head"));
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
        if text.is_empty() {
            break;
        }
        lines.push(text);
    }
    let status = lines
        .first()
        .ok_or_else(|| format!("{url} sent an empty answer"))?;
    let mut words = status.split_whitespace();
    let code = match (words.next(), words.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code,
        _ => return Err(format!("{url} did not answer in HTTP/1.x: `{status}`")),
    };
    if code != "200" {
        return Err(format!("{url} answered `{status}`"));
    }
    let mut remaining = None;
    for header in &lines[1..] {
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: u64 = value
                .parse()
                .map_err(|_| format!("{url} sent a bad Content-Length `{value}`"))?;
            if length > limit {
                return Err(format!(
                    "{url} is {length} bytes, over the limit of {limit} bytes"
                ));
            }
            remaining = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(format!(
                "{url} uses Transfer-Encoding `{value}`, which the agent does not read; serve it with a Content-Length"
            ));
        }
    }
    Ok(Body {
        reader,
        remaining,
        limit,
        read: 0,
        shown: url.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let url = parse_url("http://10.0.0.1:8080/agents/new?x=1#frag").unwrap();
        assert_eq!(url.host, "10.0.0.1");
        assert_eq!(url.port, 8080);
        assert_eq!(url.authority, "10.0.0.1:8080");
        assert_eq!(url.target, "/agents/new?x=1");
        let url = parse_url("http://host").unwrap();
        assert_eq!((url.port, url.target.as_str()), (80, "/"));
        let url = parse_url("http://[fd00::1]:81/a").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("fd00::1", 81));
    }

    #[test]
    fn other_urls_are_refused() {
        for bad in [
            "https://host/a",
            "ftp://host",
            "http://",
            "http://user@host/",
            "http://host:port/",
            "http://host/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?} accepted");
        }
    }
}

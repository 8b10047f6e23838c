//! Refuses HTTP/1.1 requests that are ambiguous about their length, before hyper
//! reads them.
//!
//! hyper reads a request with both `Content-Length` and `Transfer-Encoding` as
//! chunked, and one with two equal `Content-Length`s as having that length; both are
//! how request smuggling starts when another server on the path reads them
//! differently. [`Strict`] wraps a connection's read side, follows the framing of
//! each request (head, then a body of known length or chunks), and when a head is
//! ambiguous (`Content-Length` with `Transfer-Encoding`, more than one
//! `Content-Length`, a `Transfer-Encoding` other than `chunked`, a length that is
//! not a number) replaces the rest of it with bytes no parser accepts: hyper then
//! answers `400 Bad Request` and closes the connection, so nothing of the request
//! reaches a VM. Obsolete line folding is refused by hyper's own parser. Once a
//! connection upgrades (WebSocket) or anything unexpected is seen, checking stops
//! and hyper's own strict parsing applies.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What replaces a refused head: a control character where a request line or
/// header must be.
const POISON: &[u8] = b"\x01\r\n\r\n";
/// The longest chunk-size line followed (extensions included).
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// In a body with this many bytes left.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize,
    /// In a chunk with this many data bytes left, then its CRLF.
    ChunkData(u64),
    /// Reading the CRLF after a chunk's data (bytes of it left).
    ChunkEnd(u8),
    /// Reading trailer lines after the last chunk.
    Trailers,
    /// Not checking any more.
    Off,
    /// A refused head was replaced; the rest of the stream is not read.
    Refused,
}

/// A connection whose requests are checked for ambiguous lengths.
#[derive(Debug)]
pub struct Strict<S> {
    inner: S,
    state: State,
    /// The head (or chunk or trailer line) being read.
    line: Vec<u8>,
    max_head: usize,
    /// Bytes to hand out before reading more (the poison).
    pending: &'static [u8],
}

impl<S> Strict<S> {
    /// Checks the requests read from `inner`; heads longer than `max_head` are left
    /// to hyper's own limit.
    pub fn new(inner: S, max_head: usize) -> Self {
        Self {
            inner,
            state: State::Head,
            line: Vec::new(),
            max_head,
            pending: &[],
        }
    }

    /// Follows `data`; the offset where a refused head's bytes start in it, if one
    /// was refused.
    fn scan(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Off | State::Refused => return None,
                State::Head => {
                    // Empty lines before a request line are allowed and skipped.
                    if self.line.is_empty() && (data[i] == b'\r' || data[i] == b'\n') {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    let (used, done) = take_until_blank_line(&mut self.line, &data[i..]);
                    i += used;
                    if self.line.len() > self.max_head {
                        self.state = State::Off;
                        return None;
                    }
                    if done {
                        match check_head(&self.line) {
                            Verdict::Next(next) => self.state = next,
                            Verdict::Refuse => {
                                tracing::debug!("refused a request ambiguous about its length");
                                self.state = State::Refused;
                                self.line.clear();
                                // The head started in an earlier read when the line
                                // held more than this read gave.
                                return Some(start);
                            }
                        }
                        self.line.clear();
                    }
                }
                State::Body(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if left == n {
                        State::Head
                    } else {
                        State::Body(left - n)
                    };
                }
                State::ChunkSize => {
                    let (used, done) = take_line(&mut self.line, &data[i..]);
                    i += used;
                    if self.line.len() > MAX_CHUNK_LINE {
                        self.state = State::Off;
                        return None;
                    }
                    if done {
                        self.state = match chunk_size(&self.line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::Off,
                        };
                        self.line.clear();
                    }
                }
                State::ChunkData(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if left == n {
                        State::ChunkEnd(2)
                    } else {
                        State::ChunkData(left - n)
                    };
                }
                State::ChunkEnd(left) => {
                    let expected = if left == 2 { b'\r' } else { b'\n' };
                    if data[i] != expected {
                        self.state = State::Off;
                        return None;
                    }
                    i += 1;
                    self.state = if left == 1 {
                        State::ChunkSize
                    } else {
                        State::ChunkEnd(1)
                    };
                }
                State::Trailers => {
                    let (used, done) = take_line(&mut self.line, &data[i..]);
                    i += used;
                    if self.line.len() > self.max_head {
                        self.state = State::Off;
                        return None;
                    }
                    if done {
                        let empty = self.line == b"\r\n" || self.line == b"\n";
                        self.line.clear();
                        if empty {
                            self.state = State::Head;
                        }
                    }
                }
            }
        }
        None
    }
}

/// Appends to `line` up to and including the first `\n`; (bytes used, whether a
/// line ended).
fn take_line(line: &mut Vec<u8>, data: &[u8]) -> (usize, bool) {
    match data.iter().position(|&b| b == b'\n') {
        Some(end) => {
            line.extend_from_slice(&data[..=end]);
            (end + 1, true)
        }
        None => {
            line.extend_from_slice(data);
            (data.len(), false)
        }
    }
}

/// Appends to `head` up to and including the blank line that ends it; (bytes used,
/// whether it ended).
fn take_until_blank_line(head: &mut Vec<u8>, data: &[u8]) -> (usize, bool) {
    let mut used = 0;
    while used < data.len() {
        let (n, done) = take_line(head, &data[used..]);
        used += n;
        if done && (head.ends_with(b"\n\r\n") || head.ends_with(b"\n\n")) {
            return (used, true);
        }
    }
    (used, false)
}

/// The size of a chunk-size line (`1a;ext=1\r\n`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = std::str::from_utf8(line).ok()?;
    let size = line
        .trim_end_matches(['\r', '\n'])
        .split(';')
        .next()?
        .trim();
    if size.is_empty() || size.len() > 16 {
        return None;
    }
    u64::from_str_radix(size, 16).ok()
}

enum Verdict {
    Next(State),
    Refuse,
}

fn check_head(head: &[u8]) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // hyper's parser refuses what httparse refuses (obsolete folding among
        // it); more headers than followed here: leave the rest to hyper.
        _ => return Verdict::Next(State::Off),
    }
    let mut lengths = 0;
    let mut length = None;
    let mut encodings = Vec::new();
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            let Ok(v) = std::str::from_utf8(h.value) else {
                return Verdict::Refuse;
            };
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Verdict::Refuse;
            }
            length = v.parse::<u64>().ok();
            if length.is_none() {
                return Verdict::Refuse;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encodings.push(String::from_utf8_lossy(h.value).trim().to_ascii_lowercase());
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if lengths > 1 || (lengths == 1 && !encodings.is_empty()) {
        return Verdict::Refuse;
    }
    if !encodings.is_empty() {
        // One coding, and it is `chunked`: gzip or the like in a request is not
        // something the edge decodes, and a list invites disagreement.
        if encodings.len() != 1 || encodings[0] != "chunked" {
            return Verdict::Refuse;
        }
        return Verdict::Next(State::ChunkSize);
    }
    if upgrade || req.method == Some("CONNECT") {
        return Verdict::Next(State::Off);
    }
    match length {
        Some(n) if n > 0 => Verdict::Next(State::Body(n)),
        _ => Verdict::Next(State::Head),
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Strict<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.pending.is_empty() {
            let n = this.pending.len().min(buf.remaining());
            buf.put_slice(&this.pending[..n]);
            this.pending = &this.pending[n..];
            return Poll::Ready(Ok(()));
        }
        if this.state == State::Refused {
            // The poison was handed out: the stream ends here for hyper.
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.state == State::Off {
            return Poll::Ready(Ok(()));
        }
        let read = buf.filled()[before..].to_vec();
        if let Some(at) = this.scan(&read) {
            buf.set_filled(before + at);
            this.pending = POISON;
            if at == 0 {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending = &this.pending[n..];
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Strict<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `input`, read `step` bytes at a time, is refused (the offset in the
    /// whole input where the refused head's bytes of that read start).
    fn scan_all(input: &[u8], step: usize) -> Option<usize> {
        let mut s = Strict::new((), 64 * 1024);
        for (n, chunk) in input.chunks(step).enumerate() {
            if let Some(at) = s.scan(chunk) {
                return Some(n * step + at);
            }
        }
        None
    }

    fn refused(input: &[u8]) -> bool {
        let all: Vec<bool> = [1, 3, 7, input.len()]
            .iter()
            .map(|&step| scan_all(input, step).is_some())
            .collect();
        assert!(all.iter().all(|r| *r == all[0]), "every split agrees");
        all[0]
    }

    #[test]
    fn ambiguous_lengths_are_refused_however_the_bytes_arrive() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(refused(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_smuggled_request_after_a_good_one_is_refused_where_it_starts() {
        let good = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody".to_vec();
        let chunked =
            b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n"
                .to_vec();
        let bad = b"GET /c HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
            .to_vec();
        let stream = [good.clone(), chunked.clone(), bad].concat();
        let bad_at = good.len() + chunked.len();
        for step in [1, 5, stream.len()] {
            let at = scan_all(&stream, step).expect("refused");
            // Nothing before the bad request is touched.
            assert!(at >= bad_at && at < stream.len(), "step {step}: {at}");
        }
        // Good requests alone pass, and the state ends at a head.
        let fine = [good, chunked, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()].concat();
        let mut s = Strict::new((), 1 << 16);
        assert_eq!(s.scan(&fine), None);
        assert_eq!(s.state, State::Head);
    }

    #[test]
    fn upgrades_stop_the_checking() {
        let mut s = Strict::new((), 1 << 16);
        let ws = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        assert_eq!(s.scan(ws), None);
        assert_eq!(s.state, State::Off);
    }

    #[tokio::test]
    async fn hyper_answers_400_and_the_service_never_sees_the_request() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        async {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(Strict::new(stream, 1 << 16));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(bad).await.unwrap();
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).await.unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        }
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        // A good request still works.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }
}

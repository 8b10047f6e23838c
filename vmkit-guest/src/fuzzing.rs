//! Entry points for the fuzz targets in `fuzz/`: the frame reader and both message
//! parsers, which see untrusted bytes (the host reads the guest's, and a guest may read a
//! compromised control plane's). Not a stable API.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::frame::{decode, encode_frame, read_frame};
use crate::message::{Reply, ReplyFrame, Request, RequestFrame};

/// Runs a future that never waits (it only reads from a byte slice).
fn run<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
}

/// Reads `data` as a stream of frames of at most `max` bytes until it ends or breaks,
/// and decodes each body both as a request and as a reply. Whatever decodes must
/// encode and decode again to the same message.
///
/// # Panics
///
/// When a decoded message does not survive that round trip: a parser bug.
pub fn frames(data: &[u8], max: usize) {
    let mut reader = data;
    while let Ok(Some(body)) = run(read_frame(&mut reader, max)) {
        assert!(
            !body.is_empty() && body.len() <= max,
            "read_frame broke its cap"
        );
        message(&body);
    }
}

/// Decodes `body` as a request envelope and as a reply envelope and checks that
/// whatever decodes round-trips.
///
/// # Panics
///
/// As [`frames`].
pub fn message(body: &[u8]) {
    if let Ok(frame) = decode::<RequestFrame<Request>>(body) {
        let encoded = encode_frame(&frame, usize::MAX).expect("a decoded request encodes");
        let again: RequestFrame<Request> =
            decode(&encoded[4..]).expect("an encoded request decodes");
        assert_eq!(frame.id, again.id);
        assert_eq!(
            frame.request, again.request,
            "a request changed in a round trip"
        );
    }
    if let Ok(frame) = decode::<ReplyFrame<Reply>>(body) {
        let encoded = encode_frame(&frame, usize::MAX).expect("a decoded reply encodes");
        let again: ReplyFrame<Reply> = decode(&encoded[4..]).expect("an encoded reply decodes");
        assert_eq!(frame.id, again.id);
        assert_eq!(frame.reply, again.reply, "a reply changed in a round trip");
    }
}

//! A request body made of several buffers, sent as they are (no copy into
//! one buffer), with its exact length known up front.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The body of every request we send: nothing (GET, OPTIONS), one buffer
/// (PATCH) or the buffers of a PUT, one frame each.
#[derive(Debug, Default)]
pub struct Parts {
    parts: VecDeque<Bytes>,
    remaining: u64,
}

impl Parts {
    /// No body.
    pub fn empty() -> Self {
        Parts::default()
    }

    /// The body for `parts`, in order (empty buffers skipped).
    pub fn new(parts: &[Bytes]) -> Self {
        Parts {
            remaining: parts.iter().map(|p| p.len() as u64).sum(),
            parts: parts.iter().filter(|p| !p.is_empty()).cloned().collect(),
        }
    }

    /// Bytes left to send.
    pub fn content_length(&self) -> u64 {
        self.remaining
    }
}

impl From<Vec<u8>> for Parts {
    fn from(body: Vec<u8>) -> Self {
        Parts::new(&[Bytes::from(body)])
    }
}

impl Body for Parts {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.parts.pop_front().map(|b| {
            this.remaining = this.remaining.saturating_sub(b.len() as u64);
            Ok(Frame::data(b))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.parts.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn parts_go_out_in_order_with_their_length() {
        let body = Parts::new(&[
            Bytes::from_static(b"ab"),
            Bytes::new(),
            Bytes::from_static(b"cde"),
        ]);
        assert_eq!(body.content_length(), 5);
        assert_eq!(body.size_hint().exact(), Some(5));
        let all = body.collect().await.expect("infallible").to_bytes();
        assert_eq!(&all[..], b"abcde");
        let empty = Parts::empty();
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }
}

//! A request body made of several buffers, sent as they are (no copy into
//! one buffer), with its exact length known up front.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The body for `parts`: one buffer as is, several as a stream of frames.
pub fn parts(parts: &[Bytes]) -> reqwest::Body {
    match parts {
        [one] => reqwest::Body::from(one.clone()),
        many => reqwest::Body::wrap(Parts {
            remaining: many.iter().map(|p| p.len() as u64).sum(),
            parts: many.iter().cloned().collect(),
        }),
    }
}

struct Parts {
    parts: VecDeque<Bytes>,
    remaining: u64,
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
            this.remaining -= b.len() as u64;
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

//! The byte streams a connection runs over, and how each splits into the
//! reading and writing halves of the transmission phase.
//!
//! The handshake needs the whole stream (STARTTLS replaces it with a TLS
//! stream over it); transmission reads and writes from two tasks. Plain
//! sockets split for free (`into_split`); a TLS stream splits through
//! `tokio::io::split`.

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};

/// A connection's byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The reading half.
    type Reader: AsyncRead + Unpin + Send + 'static;
    /// The writing half.
    type Writer: AsyncWrite + Unpin + Send + 'static;
    /// Split for the transmission phase.
    fn into_halves(self) -> (Self::Reader, Self::Writer);
}

impl Stream for TcpStream {
    type Reader = tokio::net::tcp::OwnedReadHalf;
    type Writer = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl Stream for UnixStream {
    type Reader = tokio::net::unix::OwnedReadHalf;
    type Writer = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl Stream for DuplexStream {
    type Reader = ReadHalf<DuplexStream>;
    type Writer = WriteHalf<DuplexStream>;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }
}

impl<S: Stream> Stream for tokio_rustls::server::TlsStream<S> {
    type Reader = ReadHalf<Self>;
    type Writer = WriteHalf<Self>;
    fn into_halves(self) -> (Self::Reader, Self::Writer) {
        tokio::io::split(self)
    }
}

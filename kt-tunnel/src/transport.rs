//! The byte stream under an SSH connection, read ahead of russh.
//!
//! russh's session loop does not read while it writes: each round it writes out what it
//! queued (up to 64 messages, about 2 MiB of channel data) and then handles one incoming
//! packet. When both ends carry bulk data each way, both loops end up writing into full
//! socket buffers with neither reading, and the connection deadlocks — a fixed-size buffer
//! in between only delays that, since each loop writes faster than it reads. So a task of
//! its own reads the transport into a queue without a size limit: the peer's writes always
//! drain, and the peer's loop always gets back to reading ours.
//!
//! What bounds that queue is SSH flow control: with window-on-consumption at both ends
//! (`config`), a peer has at most one window of data in flight per channel, wherever it
//! sits (this queue, russh's queues, the bridge), so a connection holds at most
//! open channels × `config::WINDOW`, plus small control messages.
//!
//! The queue holds the reads themselves (`Bytes` cut from one large buffer), not a copy: a
//! byte pipe such as tokio's `simplex` copied every byte once more and reallocated as it
//! grew, which the agent-direct profile showed (issue 17).

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{self, AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf, WriteHalf};
use tokio::sync::mpsc;

/// Bytes reserved for transport reads at a time; one read fills at most what is left of it.
/// Below 128 KiB, so that musl's allocator (kt's static builds) serves it from its heap
/// rather than with an `mmap` and `munmap` each time.
const READ_CHUNK: usize = 64 * 1024;

/// Below this much room left in the read buffer, a new `READ_CHUNK` is reserved first
/// (reusing the buffer when every chunk cut from it was consumed), so reads are never made
/// tiny by the end of a buffer.
const MIN_READ_ROOM: usize = 16 * 1024;

/// What russh runs on: reads come from the read-ahead queue, writes go to the transport.
///
/// Reads end (end-of-file) when the transport ended or failed (the reader task logs a
/// failure at debug level) and everything read before that was consumed.
pub struct ReadAhead<S> {
    /// Reads of the transport, in order; closed when the reader task ends.
    chunks: mpsc::UnboundedReceiver<Bytes>,
    /// What is left of the chunk being consumed.
    current: Bytes,
    transport_tx: WriteHalf<S>,
}

/// Splits `stream` and returns the stream to hand to russh together with the reader task,
/// which the caller spawns (on its tracker). The task ends when the transport ends (russh
/// then reads end-of-file) or when russh drops its stream.
pub fn read_ahead<S>(stream: S) -> (ReadAhead<S>, impl Future<Output = ()> + Send + 'static)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut transport_rx, transport_tx) = io::split(stream);
    let (chunks_tx, chunks) = mpsc::unbounded_channel();
    let reader = async move {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK);
        // One future for the whole loop: `closed` registers with the channel when polled.
        let russh_gone = chunks_tx.closed();
        tokio::pin!(russh_gone);
        loop {
            if buffer.capacity() < MIN_READ_ROOM {
                buffer.reserve(READ_CHUNK);
            }
            let read = tokio::select! {
                // russh dropped its stream: nobody reads any more.
                () = &mut russh_gone => break,
                // Cancel-safe (tokio's `read_buf`): a read is either complete or not made.
                read = transport_rx.read_buf(&mut buffer) => read,
            };
            match read {
                Ok(0) => break,
                Ok(_) => {
                    if chunks_tx.send(buffer.split().freeze()).is_err() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "SSH transport read ended with an error");
                    break;
                }
            }
        }
    };
    let stream = ReadAhead {
        chunks,
        current: Bytes::new(),
        transport_tx,
    };
    (stream, reader)
}

impl<S: AsyncRead + AsyncWrite> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        while this.current.is_empty() {
            match ready!(this.chunks.poll_recv(cx)) {
                Some(chunk) => this.current = chunk,
                // The reader ended: end-of-file.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.current.len());
        buf.put_slice(&this.current[..n]);
        this.current.advance(n);
        if this.current.is_empty() {
            // Let go of the chunk's buffer now, so the reader can reuse it.
            this.current = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport_tx).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.transport_tx).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.transport_tx.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport_tx).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.transport_tx).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Everything the peer writes arrives in order, across many reads and chunk boundaries,
    /// and is read ahead even while nobody reads (the peer's writes complete); writes go to
    /// the peer; the peer's close is end-of-file after the data.
    #[tokio::test]
    async fn reads_ahead_in_order_and_writes_through() {
        let (ours, mut peer) = io::duplex(64 * 1024);
        let (mut stream, reader) = read_ahead(ours);
        let reader = tokio::spawn(reader);

        let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // More than the duplex buffer: completes only because the reader drains it.
        peer.write_all(&sent).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        peer.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        drop(peer);

        let mut received = Vec::new();
        let mut small = [0u8; 1000];
        // Small reads first, so a read ends inside a chunk.
        for _ in 0..10 {
            let n = stream.read(&mut small).await.unwrap();
            received.extend_from_slice(&small[..n]);
        }
        stream.read_to_end(&mut received).await.unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "bytes arrived reordered or changed");
        reader.await.unwrap();
    }

    /// Dropping the stream ends the reader task even when the transport stays open and idle.
    #[tokio::test]
    async fn reader_ends_when_the_stream_is_dropped() {
        let (ours, _peer) = io::duplex(1024);
        let (stream, reader) = read_ahead(ours);
        let reader = tokio::spawn(reader);
        drop(stream);
        tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the reader task ended")
            .unwrap();
    }
}

//! The byte stream under an SSH connection, read ahead of russh.
//!
//! russh's session loop does not read while it writes: each round it writes out what it
//! queued (up to 64 messages, about 2 MiB of channel data) and then handles one incoming
//! packet. When both ends carry bulk data each way, both loops end up writing into full
//! socket buffers with neither reading, and the connection deadlocks — a fixed-size buffer
//! in between only delays that, since each loop writes faster than it reads. So a task of
//! its own reads the transport into a buffer without a size limit: the peer's writes always
//! drain, and the peer's loop always gets back to reading ours.
//!
//! What bounds that buffer is SSH flow control: with window-on-consumption at both ends
//! (`config`), a peer has at most one window of data in flight per channel, wherever it
//! sits (this buffer, russh's queues, the bridge), so a connection holds at most
//! open channels × `config::WINDOW`, plus small control messages.

use std::future::Future;

use tokio::io::{
    self, AsyncRead, AsyncWrite, AsyncWriteExt, Join, ReadHalf, SimplexStream, WriteHalf,
};

/// No limit of its own (see above); the windows are the limit.
const READ_AHEAD_LIMIT: usize = usize::MAX;

/// Transport reads.
const READ_CHUNK: usize = 256 * 1024;

/// What russh runs on: reads come from the read-ahead buffer, writes go to the transport.
pub type ReadAhead<S> = Join<ReadHalf<SimplexStream>, WriteHalf<S>>;

/// Splits `stream` and returns the stream to hand to russh together with the reader task,
/// which the caller spawns (on its tracker). The task ends when the transport ends (russh
/// then reads end-of-file) or when russh drops its stream.
pub fn read_ahead<S>(stream: S) -> (ReadAhead<S>, impl Future<Output = ()> + Send + 'static)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut transport_rx, transport_tx) = io::split(stream);
    let (buffer_rx, mut buffer_tx) = io::simplex(READ_AHEAD_LIMIT);
    let reader = async move {
        let mut transport_rx = io::BufReader::with_capacity(READ_CHUNK, &mut transport_rx);
        if let Err(error) = io::copy_buf(&mut transport_rx, &mut buffer_tx).await {
            tracing::debug!(%error, "SSH transport read ended with an error");
        }
        let _ = buffer_tx.shutdown().await;
    };
    (io::join(buffer_rx, transport_tx), reader)
}

//! Joins an SSH channel to a TCP connection, both ways, with half-close passed on.
//!
//! Flow control is SSH's own: both kt ends run russh with `window_on_consumption` (kt's
//! patch, `vendor/KT-PATCH.md`), and the bridge reports each write to the socket as consumed,
//! so a peer never has more than one window (`config::WINDOW`) in flight on a channel and a
//! channel's memory is bounded by it. The bridge takes every message off russh's queue as
//! it arrives, so russh's session loop never waits on one slow channel: a stalled consumer
//! holds back its own peer, not the other channels of the connection.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    pin::pin,
};

use bytes::{Buf, Bytes, BytesMut};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Socket reads: two full SSH packets, so a busy socket fills packets.
const READ_CHUNK: usize = 64 * 1024;

/// Buffers handed to one vectored write.
const WRITE_SLICES: usize = 64;

/// Bytes moved by one bridge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the channel to the socket.
    pub to_socket: u64,
    /// From the socket into the channel.
    pub to_channel: u64,
}

/// How the channel's inbound side ended.
enum InboundEnd {
    /// The peer half-closed: it sends no more but may still read.
    Eof,
    /// The channel (or the whole connection) is gone.
    Closed,
}

/// Copies until both directions are done (or the channel closes, or an error), then closes
/// the channel. Cancel-safe: dropping it drops the socket and the channel.
pub async fn bridge<S>(channel: Channel<S>, socket: TcpStream) -> io::Result<Transferred>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let (socket_rx, socket_tx) = socket.into_split();
    bridge_halves(channel, socket_rx, socket_tx).await
}

/// [`bridge`] for any byte stream (a TCP stream accepted behind a TUN device, one end of an
/// in-memory pipe); a TCP socket is better served by [`bridge`], which needs no lock between
/// its halves.
pub async fn bridge_io<S, T>(channel: Channel<S>, stream: T) -> io::Result<Transferred>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    T: AsyncRead + AsyncWrite + Send,
{
    let (stream_rx, stream_tx) = tokio::io::split(stream);
    bridge_halves(channel, stream_rx, stream_tx).await
}

async fn bridge_halves<S>(
    channel: Channel<S>,
    mut socket_rx: impl AsyncRead + Unpin,
    mut socket_tx: impl AsyncWrite + Unpin,
) -> io::Result<Transferred>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let (mut channel_rx, channel_tx) = channel.split();
    let mut to_socket = 0;
    let mut to_channel = 0;
    let result = {
        let mut inbound = pin!(channel_to_socket(
            &mut channel_rx,
            &channel_tx,
            &mut socket_tx,
            &mut to_socket
        ));
        let mut outbound = pin!(socket_to_channel(
            &mut socket_rx,
            &channel_tx,
            &mut to_channel
        ));
        tokio::select! {
            end = &mut inbound => match end {
                // Half-closed: keep sending until the socket ends, as OpenSSH does.
                Ok(InboundEnd::Eof) => outbound.await,
                Ok(InboundEnd::Closed) => Ok(()),
                Err(error) => Err(error),
            },
            sent = &mut outbound => match sent {
                Ok(()) => inbound.await.map(drop),
                Err(error) => Err(error),
            },
        }
    };
    let _ = channel_tx.close().await;
    result.map(|()| Transferred {
        to_socket,
        to_channel,
    })
}

async fn channel_to_socket<S>(
    channel: &mut ChannelReadHalf,
    window: &ChannelWriteHalf<S>,
    socket: &mut (impl AsyncWrite + Unpin),
    moved: &mut u64,
) -> io::Result<InboundEnd>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    // At most one window: the peer sends no more until the socket has taken some.
    let mut pending = VecDeque::<Bytes>::new();
    let mut end = None;
    loop {
        if pending.is_empty()
            && let Some(end) = end
        {
            // The peer may already have gone; its half-close is what matters.
            let _ = socket.shutdown().await;
            return Ok(end);
        }
        tokio::select! {
            message = channel.wait(), if end.is_none() => match message {
                Some(ChannelMsg::Data { data }) => pending.push_back(data),
                // Nothing to put it on, but the peer's window must come back all the same.
                Some(ChannelMsg::ExtendedData { data, .. }) => consumed(window, data.len()),
                Some(ChannelMsg::Eof) => end = Some(InboundEnd::Eof),
                Some(ChannelMsg::Close) | None => end = Some(InboundEnd::Closed),
                Some(_) => {}
            },
            written = write_some(socket, &pending), if !pending.is_empty() => {
                let mut written = written?;
                *moved += written as u64;
                consumed(window, written);
                while written > 0 {
                    let front = pending.front_mut().expect("wrote from pending data");
                    if written >= front.len() {
                        written -= front.len();
                        pending.pop_front();
                    } else {
                        front.advance(written);
                        written = 0;
                    }
                }
            }
        }
    }
}

fn consumed<S>(window: &ChannelWriteHalf<S>, bytes: usize)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    // Writes are at most a window long, which fits in u32.
    let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
    // Fails only when the session is gone; the read side sees that next.
    let _ = window.consumed(bytes);
}

async fn write_some(
    socket: &mut (impl AsyncWrite + Unpin),
    pending: &VecDeque<Bytes>,
) -> io::Result<usize> {
    let slices: Vec<IoSlice<'_>> = pending
        .iter()
        .take(WRITE_SLICES)
        .map(|b| IoSlice::new(b))
        .collect();
    match socket.write_vectored(&slices).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

async fn socket_to_channel<S>(
    socket: &mut (impl AsyncRead + Unpin),
    channel: &ChannelWriteHalf<S>,
    moved: &mut u64,
) -> io::Result<()>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let mut buffer = BytesMut::new();
    loop {
        buffer.reserve(READ_CHUNK);
        let read = socket.read_buf(&mut buffer).await?;
        if read == 0 {
            return channel.eof().await.map_err(io::Error::other);
        }
        *moved += read as u64;
        channel
            .data_bytes(buffer.split().freeze())
            .await
            .map_err(io::Error::other)?;
    }
}

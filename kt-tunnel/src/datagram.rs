//! UDP over an SSH channel. SSH has no datagram channel, so kt frames datagrams on a byte
//! channel: each is a 2-byte big-endian length, then that many bytes (a UDP payload is at
//! most 65 507 bytes). ktctl opens one such channel per UDP flow to the agent or kt's shadow
//! (`kt_proto::agent::udp_relay_path`), which relays it to the destination from the cluster
//! side.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use russh::{Channel, ChannelId, ChannelMsg};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::UdpSocket,
};

/// How many framed bytes may wait between the channel and the datagram side.
const PIPE: usize = 256 * 1024;
/// The largest datagram: the whole 16-bit length.
const MAX_DATAGRAM: usize = 65_535;

/// Appends `payload` framed to `out`; `None` when it is too long for a frame.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let len = u16::try_from(payload.len()).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Some(())
}

/// The first whole datagram in `buffer` and how many bytes it took, if there is one.
pub fn decode(buffer: &[u8]) -> Option<(&[u8], usize)> {
    let len = usize::from(u16::from_be_bytes([*buffer.first()?, *buffer.get(1)?]));
    let payload = buffer.get(2..2 + len)?;
    Some((payload, 2 + len))
}

/// A connected UDP socket seen as a datagram stream: each read is one datagram received,
/// each write one datagram sent (what [`relay`] expects of its datagram side). An empty
/// datagram is skipped (zero bytes read is the end of a stream), and so is the
/// "connection refused" an ICMP port unreachable leaves for a datagram sent earlier (the
/// program on the other side is not up yet, or restarts): neither ends the flow.
pub struct ConnectedUdp(pub UdpSocket);

impl AsyncRead for ConnectedUdp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let before = buf.filled().len();
            match self.0.poll_recv(cx, buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {}
                Poll::Ready(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {}
                other => return other,
            }
        }
    }
}

impl AsyncWrite for ConnectedUdp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_send(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Relays between `channel`, carrying framed datagrams, and `datagrams`, where one read is
/// one datagram and one write sends one (a [`ConnectedUdp`], a userspace UDP flow). Ends
/// when either side ends or fails; a datagram the far side refuses is dropped, as UDP drops
/// it.
pub async fn relay<S, D>(channel: Channel<S>, datagrams: D) -> io::Result<()>
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
    D: AsyncRead + AsyncWrite + Send,
{
    let (near, far) = tokio::io::duplex(PIPE);
    let bridge = crate::bridge_io(channel, near);
    let (mut from_channel, mut to_channel) = tokio::io::split(far);
    let (mut received, mut sent) = tokio::io::split(datagrams);
    let inbound = async {
        let mut pending = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let read = from_channel.read(&mut chunk).await?;
            if read == 0 {
                return Ok::<(), io::Error>(());
            }
            pending.extend_from_slice(&chunk[..read]);
            let mut used = 0;
            while let Some((payload, taken)) = decode(&pending[used..]) {
                let _ = sent.write(payload).await;
                used += taken;
            }
            pending.drain(..used);
        }
    };
    let outbound = async {
        let mut datagram = vec![0u8; MAX_DATAGRAM];
        let mut framed = Vec::with_capacity(MAX_DATAGRAM + 2);
        loop {
            let len = received.read(&mut datagram).await?;
            if len == 0 {
                return Ok::<(), io::Error>(());
            }
            framed.clear();
            if encode(&datagram[..len], &mut framed).is_some() {
                to_channel.write_all(&framed).await?;
            }
        }
    };
    tokio::select! {
        result = inbound => result,
        result = outbound => result,
        result = bridge => result.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_length_prefixed() {
        let mut framed = Vec::new();
        encode(b"ping", &mut framed).unwrap();
        encode(b"", &mut framed).unwrap();
        assert_eq!(framed, [0, 4, b'p', b'i', b'n', b'g', 0, 0]);
        let (first, used) = decode(&framed).unwrap();
        assert_eq!((first, used), (&b"ping"[..], 6));
        assert_eq!(decode(&framed[used..]), Some((&b""[..], 2)));
        assert_eq!(decode(&framed[..5]), None, "not whole yet");
        assert!(encode(&vec![0; 70_000], &mut Vec::new()).is_none());
    }
}

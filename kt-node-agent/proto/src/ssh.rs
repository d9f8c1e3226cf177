//! SSH tuning both ends of a kt tunnel use (ktctl's client and the shadow/agent server).

/// The SSH channel window: large enough that one stream is not window-limited on a LAN.
pub const WINDOW: u32 = 8 * 1024 * 1024;

/// The largest SSH packet payload kt sends or accepts.
pub const MAX_PACKET: u32 = 32_768;

/// Packets russh queues per channel before its session loop waits: at least a window of
/// full-size packets, or a peer sending its whole window blocks the session loop and stalls
/// every channel of the connection. (Many parallel streams can still wedge a connection —
/// an open problem of issue #4.)
pub const CHANNEL_QUEUE: usize = 2 * (WINDOW / MAX_PACKET) as usize;

//! The SSH data path shared by both ends of a kt tunnel: ktctl's client and the node
//! agent's servers (roles `shadow` and `agent`).

pub mod bridge;
pub mod config;
pub mod datagram;
pub mod transport;

pub use bridge::{bridge, bridge_io};

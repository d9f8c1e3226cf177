//! Empty library target so that host-side `cargo check`/`clippy` can build this crate;
//! the programs are in `main.rs`, built for `bpfel-unknown-none` by the node agent.
#![no_std]

//! `kt-testbed`: the simulated cluster as a command (placeholder while it is built up).

fn main() {}

//! One module per ktctl subcommand.

pub mod forward;

//! The contract between `ktctl` (workstation) and `kt-node-agent` (cluster).
//!
//! Both binaries depend on this crate and on nothing of each other. It holds data and
//! rules, no I/O: the names, labels and annotations ktctl v0.3.7 writes ([`compat`]), the
//! agent-mode session object ([`session`]) and what its spec may say ([`validate`]), how ktctl finds and logs in to an agent
//! ([`agent`]), every environment variable the agent's roles read ([`env`]), kt's image
//! names and registry ([`images`]), and address ranges ([`net`]). The one
//! helper that is not data, [`error_chain`], is how both binaries print a failure.
//! Compatibility rule: a constant that a released ktctl or agent reads is never renamed or
//! re-valued; add a new one instead.

/// The kt release both sides are built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod agent;
pub mod compat;
pub mod env;
pub mod images;
pub mod net;
pub mod session;
pub mod validate;

/// An error and its sources on one line, `a: b: c`: how both binaries print a failure, so
/// that no error type repeats its source in its own message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::{fmt, io};

    #[derive(Debug)]
    struct Outer(io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("failed to open cgroup /x")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_chain_joins_sources() {
        let error = Outer(io::Error::new(io::ErrorKind::NotFound, "no such file"));
        assert_eq!(
            super::error_chain(&error),
            "failed to open cgroup /x: no such file"
        );
    }
}

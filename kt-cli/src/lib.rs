//! ktctl, a drop-in replacement for KT-Connect's `ktctl` v0.3.7.
//!
//! Differences from v0.3.7 that are deliberate: a failing command exits with code 1 (v0.3.7
//! always exits 0) while keeping its `ERR Exit: <message>` text; `--namespace` follows the
//! kubeconfig context when not given (v0.3.7 documents that but defaults to `default`).

pub mod args;
pub mod logging;

use std::{ffi::OsString, io::Write as _, process::ExitCode};

use clap::Parser as _;

use crate::args::Cli;

/// Errors that end a ktctl run; printed as `ERR Exit: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
}

/// Runs ktctl with `args` (the first being the program name) and returns its exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => return clap_error(error),
    };
    logging::init(cli.global.debug);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("Exit: {}", kt_proto::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    if cli.version {
        let mut out = std::io::stdout().lock();
        // A closed stdout (`ktctl -v | head -0`) is not an error worth reporting.
        let _ = writeln!(out, "ktctl version {}", kt_proto::VERSION);
        return Ok(());
    }
    // Bare `ktctl` prints help, as v0.3.7 does; subcommands arrive with their issues.
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", args::command().render_help());
    Ok(())
}

/// Help goes to stdout with exit 0; anything else is a usage error in ktctl's format.
fn clap_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ => {
            logging::init(false);
            let rendered = error.render().to_string();
            let message = rendered
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_owned();
            tracing::error!("Exit: {}", kt_proto::error_chain(&CliError::Usage(message)));
            ExitCode::FAILURE
        }
    }
}

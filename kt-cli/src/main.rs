//! `ktctl`: parse, set up logging, run, map the outcome to an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    kt_cli::main(std::env::args_os())
}

//! `kt-node-agent`: the cluster side of kt.
//!
//! The roles (`agent`, `shadow`, `router`) arrive with their issues; today the binary offers
//! `check`, which tells an admin whether a node can run kt's eBPF redirect.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use kt_node_agent::{cgroup, ebpf};

#[derive(Parser)]
#[command(name = "kt-node-agent", version = kt_proto::VERSION, about = "kt node agent")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this node can run kt's eBPF redirect: kernel version, cgroup2, and that the
    /// kernel verifier accepts every program. With --cgroup, also attach to that cgroup2
    /// directory and detach again.
    Check {
        /// A cgroup2 directory to test-attach to (for example the kubepods cgroup).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KT_AGENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Command::Check { cgroup } => match check(cgroup) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %kt_proto::error_chain(&error), "node check failed");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(target: Option<PathBuf>) -> Result<(), ebpf::EbpfError> {
    match cgroup::cgroup2_mount() {
        Some(mount) => tracing::info!(mount = %mount.display(), "cgroup2 hierarchy found"),
        None => tracing::warn!("no cgroup2 hierarchy is mounted"),
    }
    let mut redirector = ebpf::Redirector::load()?;
    tracing::info!("kernel verifier accepted every program");
    if let Some(dir) = target {
        redirector.attach(&dir)?;
    }
    Ok(())
}

//! ktctl, a drop-in replacement for KT-Connect's `ktctl` v0.3.7.
//!
//! Differences from v0.3.7 that are deliberate: a failing command exits with code 1 (v0.3.7
//! always exits 0) while keeping its `ERR Exit: <message>` text; `--namespace` follows the
//! kubeconfig context when not given (v0.3.7 documents that but defaults to `default`).
//!
//! Flag > config > built-in: `~/.kt/config`'s values become the clap defaults of the
//! matching flags before the command line is parsed ([`config`]), so `--help` shows them.

pub mod args;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod lifecycle;
pub mod logging;
pub mod progress;
pub mod settings;
pub mod shadow;
pub mod ssh_client;

use std::{ffi::OsString, io::Write as _, process::ExitCode};

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::{args::Cli, config::items::Items, settings::Settings};

/// Errors that end a ktctl run; printed as `ERR Exit: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line does not parse (clap's message, or cobra's wording for a missing
    /// required flag).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    /// `~/.kt/config` does not read, parse, or hold valid values.
    #[error(transparent)]
    ConfigFile(#[from] config::ConfigError),
    #[error(transparent)]
    Config(#[from] commands::config::ConfigCommandError),
    #[error(transparent)]
    Connect(#[from] commands::connect::ConnectError),
    #[error(transparent)]
    Exchange(#[from] commands::exchange::ExchangeError),
    #[error(transparent)]
    Forward(#[from] commands::forward::ForwardError),
    #[error(transparent)]
    Mesh(#[from] commands::mesh::MeshError),
    #[error(transparent)]
    Preview(#[from] commands::preview::PreviewError),
    #[error(transparent)]
    Recover(#[from] commands::recover::RecoverError),
    #[error(transparent)]
    Clean(#[from] commands::clean::CleanError),
    #[error(transparent)]
    Birdseye(#[from] commands::birdseye::BirdseyeError),
    #[error("failed to start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Runs ktctl with `args` (the first being the program name) and returns its exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    let items = Items::from_command(&Cli::command());
    let path = config::path();
    let (defaults, config_error) =
        match config::load(&path).and_then(|groups| items.defaults(&groups, &path)) {
            Ok(defaults) => (Some(defaults), None),
            Err(error) => (None, Some(error)),
        };
    let command = args::finish(match &defaults {
        Some(defaults) => defaults.apply(Cli::command()),
        None => Cli::command(),
    });
    let parsed = command
        .clone()
        .try_get_matches_from(&args)
        .and_then(|matches| Cli::from_arg_matches(&matches));
    // A bad config stops every command before it does anything, except `config` itself
    // (so that `config set`/`unset` can fix it), help and the version.
    if let Some(error) = config_error
        && !config_spared(&parsed, &args)
    {
        logging::init(false);
        let error = CliError::ConfigFile(error);
        tracing::error!("Exit: {}", kt_proto::error_chain(&error));
        return error.exit_code();
    }
    let cli = match parsed {
        Ok(cli) => cli,
        Err(error) => return clap_error(error),
    };
    logging::init(cli.global.debug);
    if let Some(defaults) = &defaults
        && !matches!(cli.command, None | Some(args::Command::Config(_)))
    {
        for ignored in &defaults.ignored {
            tracing::warn!("{ignored}");
        }
    }
    match run(cli, &command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("Exit: {}", kt_proto::error_chain(&error));
            error.exit_code()
        }
    }
}

/// Whether a run goes ahead despite a bad config: `config …`, help, the version and bare
/// `ktctl` (which prints help).
fn config_spared(parsed: &Result<Cli, clap::Error>, args: &[OsString]) -> bool {
    use clap::error::ErrorKind;
    match parsed {
        Ok(cli) => cli.version || matches!(cli.command, None | Some(args::Command::Config(_))),
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            true
        }
        // A `config` line clap refuses gets clap's message rather than the config's.
        Err(_) => Cli::command()
            .ignore_errors(true)
            .try_get_matches_from(args)
            .is_ok_and(|m| m.subcommand_name() == Some("config")),
    }
}

impl CliError {
    /// 130 (128 + SIGINT, the shell's convention) when a signal stopped the command before
    /// it did what it was asked; 1 for every other failure (v0.3.7 always exits 0).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Exchange(commands::exchange::ExchangeError::Interrupted)
            | Self::Mesh(commands::mesh::MeshError::Interrupted)
            | Self::Preview(commands::preview::PreviewError::Interrupted)
            | Self::Connect(commands::connect::ConnectError::Interrupted) => ExitCode::from(130),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Runs a parsed command line: settings first (no cluster call before they are valid),
/// then the command. `clap_command` is the clap command `cli` was parsed with (with the
/// configured defaults), for help.
pub fn run(cli: Cli, clap_command: &clap::Command) -> Result<(), CliError> {
    if cli.version {
        let mut out = std::io::stdout().lock();
        // A closed stdout (`ktctl -v | head -0`) is not an error worth reporting.
        // v0.3.7's `ktctl version <version>` first (scripts parse it), then what this build is.
        let _ = writeln!(
            out,
            "ktctl version {} (commit {}, {})",
            kt_proto::VERSION,
            env!("KT_GIT_COMMIT"),
            env!("KT_TARGET")
        );
        return Ok(());
    }
    let Some(command) = cli.command else {
        // Bare `ktctl` prints help, as v0.3.7 does.
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{}", clap_command.clone().render_help());
        return Ok(());
    };
    if let args::Command::Completion(completion) = &command {
        // Needs no settings and no cluster: the script goes to stdout — through a buffer,
        // since clap_complete panics when its writer fails, and a closed stdout (`ktctl
        // completion bash | head -1`) is not an error worth reporting.
        let mut script = Vec::new();
        clap_complete::generate(
            completion.shell,
            &mut clap_command.clone(),
            "ktctl",
            &mut script,
        );
        let _ = std::io::stdout().lock().write_all(&script);
        return Ok(());
    }
    if let args::Command::Config(config) = &command {
        let Some(action) = &config.action else {
            // Bare `ktctl config` prints its help, as v0.3.7 (cobra) does.
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{}", help(clap_command, &["config"]));
            return Ok(());
        };
        return Ok(commands::config::run(action)?);
    }
    let settings = Settings::from_args(&cli.global)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    tracing::info!(
        "KtConnect {} start at {} (linux {})",
        kt_proto::VERSION,
        std::process::id(),
        std::env::consts::ARCH
    );
    match command {
        args::Command::Connect(args) => {
            runtime.block_on(commands::connect::run(&settings, &args))?;
        }
        args::Command::Forward(args) => {
            runtime.block_on(commands::forward::run(&settings, &args))?;
        }
        args::Command::Exchange(args) => {
            runtime.block_on(commands::exchange::run(&settings, &args))?;
        }
        args::Command::Mesh(args) => {
            runtime.block_on(commands::mesh::run(&settings, &args))?;
        }
        args::Command::Preview(args) => {
            runtime.block_on(commands::preview::run(&settings, &args))?;
        }
        args::Command::Recover(args) => {
            runtime.block_on(commands::recover::run(&settings, &args.service))?;
        }
        args::Command::Clean(args) => {
            runtime.block_on(commands::clean::run(&settings, &args))?;
        }
        args::Command::Birdseye(args) => {
            runtime.block_on(commands::birdseye::run(&settings, &args))?;
        }
        // Handled above, before settings: they need neither them nor a runtime.
        args::Command::Completion(_) | args::Command::Config(_) => {}
    }
    Ok(())
}

/// The help of the subcommand at `path`, as `ktctl <path> --help` prints it.
fn help(clap_command: &clap::Command, path: &[&str]) -> String {
    let line = std::iter::once("ktctl")
        .chain(path.iter().copied())
        .chain(["--help"]);
    match clap_command.clone().try_get_matches_from(line) {
        Err(error) => error.render().to_string(),
        Ok(_) => String::new(),
    }
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
            let message = missing_flags(&error).unwrap_or_else(|| {
                error
                    .render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("error: ")
                    .to_owned()
            });
            tracing::error!("Exit: {}", kt_proto::error_chain(&CliError::Usage(message)));
            ExitCode::FAILURE
        }
    }
}

/// cobra's wording for missing required flags (`required flag(s) "expose" not set`), which
/// scripts written for v0.3.7 may look for.
fn missing_flags(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::MissingRequiredArgument {
        return None;
    }
    let Some(ContextValue::Strings(args)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let names: Vec<String> = args
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| {
            let flag = a.trim_start_matches('-');
            format!("\"{}\"", flag.split([' ', '=']).next().unwrap_or(flag))
        })
        .collect();
    (!names.is_empty()).then(|| format!("required flag(s) {} not set", names.join(", ")))
}

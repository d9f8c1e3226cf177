//! The settings step between parsing and doing (ripgrep's low-level → high-level
//! arguments): the parsed command line becomes validated settings *before any cluster call*.
//! Map flags (`--withLabel`, `--nodeSelector`, …) are parsed here, durations become
//! [`Duration`]s, the transport a kt type, and every flag that is accepted but does nothing
//! yet is named in a warning, so that no flag is silently ignored.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use crate::{
    args::{GlobalOptions, TransportArg},
    ssh_client::Transport,
};

/// A command line that parses but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// ktctl v0.3.7's map flags take `k1=v1,k2=v2`.
    #[error("invalid {flag} '{pair}', should be key=value")]
    Pair { flag: &'static str, pair: String },
    /// `--podQuota` takes `<cpu>c` and `<memory>k|m|g`, comma separated.
    #[error(
        "invalid --podQuota '{part}' in '{quota}', should be like '0.5c,512m' (CPU cores with 'c', memory with 'k', 'm' or 'g')"
    )]
    PodQuota { quota: String, part: String },
}

/// Everything a command needs from the global flags, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster: ClusterSettings,
    pub shadow: ShadowSettings,
    pub ssh: SshSettings,
    pub identity: Identity,
    /// `-d/--debug`: debug logs here and in the shadow (`KT_LOG_LEVEL`).
    pub debug: bool,
}

/// Which cluster and namespace (`-c`, `--context`, `-n`).
#[derive(Clone, Debug, Default)]
pub struct ClusterSettings {
    /// `-c`; the default kubeconfig (`$KUBECONFIG`, `~/.kube/config`) when `None`.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// `-n`; the context's namespace when `None`.
    pub namespace: Option<String>,
    /// `--useLocalTime`: heartbeats and staleness by this machine's clock instead of the
    /// API server's.
    pub use_local_time: bool,
}

/// What goes into the shadow pods kt starts when no agent does the work.
#[derive(Clone, Debug)]
pub struct ShadowSettings {
    pub image: String,
    /// `-f`: `imagePullPolicy: Always` instead of `IfNotPresent`.
    pub always_pull: bool,
    pub image_pull_secret: Option<String>,
    pub service_account: String,
    pub node_selector: BTreeMap<String, String>,
    /// `-l`: extra labels.
    pub labels: BTreeMap<String, String>,
    /// `--withAnnotation`: extra annotations.
    pub annotations: BTreeMap<String, String>,
    /// `--podQuota`: the resources every kt pod requests and is limited to.
    pub quota: PodQuota,
    /// `--useShadowDeployment`: shadows are Deployments of one pod instead of bare pods.
    pub as_deployment: bool,
    /// `--podCreationTimeout`.
    pub creation_timeout: Duration,
    /// The shadow flags given with other than their default values (they do nothing in
    /// agent mode, which starts no shadow).
    pub customised: Vec<&'static str>,
}

/// How the SSH tunnel is made.
#[derive(Clone, Copy, Debug)]
pub struct SshSettings {
    pub transport: Transport,
    /// `--sshConnections` (default 2).
    pub connections: usize,
    /// Whether `--sshConnections` was given (only `forward` uses more than one).
    pub connections_given: bool,
    /// `--portForwardTimeout`: how long the first SSH connection may take to come up.
    pub connect_timeout: Duration,
}

/// Who runs ktctl, as v0.3.7 records it (`kt-user`) and kt names session owners.
#[derive(Clone, Debug)]
pub struct Identity {
    /// `SUDO_USER` when run with sudo, else `USER`, `LOGNAME` or `USERNAME`, else the passwd
    /// name of the real user id (containers and cron often set none of them), else
    /// `uid-<n>`.
    pub user: String,
    /// The kernel's host name.
    pub host: String,
}

/// The passwd name of this process's real user id, else `uid-<n>` (Unix); `unknown`
/// elsewhere.
fn user_of_this_process() -> String {
    #[cfg(unix)]
    {
        // SAFETY: getuid has no failure mode.
        let uid = unsafe { libc::getuid() };
        std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|passwd| passwd_name(&passwd, uid))
            .unwrap_or_else(|| format!("uid-{uid}"))
    }
    #[cfg(not(unix))]
    "unknown".to_owned()
}

/// The name of user `uid` in an `/etc/passwd` text (`name:password:uid:gid:…` lines,
/// passwd(5)); `None` when no line has that uid.
#[cfg_attr(not(unix), allow(dead_code))]
fn passwd_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

impl Identity {
    /// This process's user and host.
    pub fn current() -> Self {
        // `USERNAME` is Windows's.
        let user = ["SUDO_USER", "USER", "LOGNAME", "USERNAME"]
            .into_iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(user_of_this_process);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        Self { user, host }
    }

    /// `user@host`: who holds an agent-mode session, named in conflict errors.
    pub fn owner(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }
}

/// The default SSH connections per session.
const DEFAULT_SSH_CONNECTIONS: usize = 2;

impl Settings {
    /// Validates the global flags and warns about those that do nothing yet.
    pub fn from_args(global: &GlobalOptions) -> Result<Self, SettingsError> {
        for warning in unimplemented_flags(global) {
            tracing::warn!("{warning}");
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let defaults = <crate::args::Cli as clap::Parser>::parse_from(["ktctl"]).global;
        let customised = [
            ("--image", global.image != defaults.image),
            ("--imagePullSecret", !global.image_pull_secret.is_empty()),
            (
                "--serviceAccount",
                global.service_account != defaults.service_account,
            ),
            ("--nodeSelector", !global.node_selector.is_empty()),
            ("--withLabel", !global.with_label.is_empty()),
            ("--withAnnotation", !global.with_annotation.is_empty()),
            ("--forceUpdate", global.force_update),
            ("--podQuota", !global.pod_quota.is_empty()),
            ("--useShadowDeployment", global.use_shadow_deployment),
            (
                "--podCreationTimeout",
                global.pod_creation_timeout != defaults.pod_creation_timeout,
            ),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        Ok(Self {
            cluster: ClusterSettings {
                kubeconfig: non_empty(&global.kubeconfig).map(PathBuf::from),
                context: non_empty(&global.context),
                namespace: global.namespace.clone(),
                use_local_time: global.use_local_time,
            },
            shadow: ShadowSettings {
                image: global.image.clone(),
                always_pull: global.force_update,
                image_pull_secret: non_empty(&global.image_pull_secret),
                service_account: global.service_account.clone(),
                node_selector: parse_pairs("--nodeSelector", &global.node_selector)?,
                labels: parse_pairs("--withLabel", &global.with_label)?,
                annotations: parse_pairs("--withAnnotation", &global.with_annotation)?,
                quota: PodQuota::parse(&global.pod_quota)?,
                as_deployment: global.use_shadow_deployment,
                creation_timeout: Duration::from_secs(u64::from(global.pod_creation_timeout)),
                customised,
            },
            ssh: SshSettings {
                transport: match global.transport {
                    TransportArg::Auto => Transport::Auto,
                    TransportArg::Direct => Transport::Direct,
                    TransportArg::PortForward => Transport::PortForward,
                },
                connections: global
                    .ssh_connections
                    .map_or(DEFAULT_SSH_CONNECTIONS, usize::from),
                connections_given: global.ssh_connections.is_some(),
                connect_timeout: Duration::from_secs(u64::from(global.port_forward_timeout)),
            },
            identity: Identity::current(),
            debug: global.debug,
        })
    }
}

/// Warnings for the v0.3.7 flags kt accepts but does not act on yet.
fn unimplemented_flags(global: &GlobalOptions) -> Vec<String> {
    let mut warnings = Vec::new();
    if global.as_worker {
        warnings.push("--asWorker has no effect (nor had it in v0.3.7)".into());
    }
    warnings
}

/// `--podQuota` (ktctl v0.3.7 `cluster/pod.go`): requests and limits alike, as Kubernetes
/// quantities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodQuota {
    /// CPU in the API server's canonical form (`0.5c` → `"500m"`, `2c` → `"2"`).
    pub cpu: Option<String>,
    /// Memory in binary units (`512m` → `"512Mi"`; `k` → `Ki`, `g` → `Gi`).
    pub memory: Option<String>,
}

impl PodQuota {
    /// Parses `0.5c,512m` (either part may be left out; an empty string means no quota). A
    /// part that is not a positive decimal with one of v0.3.7's suffixes, an empty part
    /// (`,`, `1c,`) and a second CPU or memory part are named in the error.
    pub fn parse(quota: &str) -> Result<Self, SettingsError> {
        let mut parsed = Self::default();
        if quota.trim().is_empty() {
            return Ok(parsed);
        }
        for part in quota.split(',').map(str::trim) {
            let bad = || SettingsError::PodQuota {
                quota: quota.to_owned(),
                part: part.to_owned(),
            };
            let Some(suffix) = part.chars().last() else {
                return Err(bad());
            };
            let number = &part[..part.len() - suffix.len_utf8()];
            // Kubernetes quantities are decimals; `1e3` or `inf` would be refused later by the
            // API server with a less helpful message.
            let decimal = !number.is_empty()
                && number.chars().all(|c| c.is_ascii_digit() || c == '.')
                && number.parse::<f64>().is_ok_and(|n| n > 0.0);
            if !decimal {
                return Err(bad());
            }
            let unit = match suffix {
                'c' => None,
                'k' => Some("Ki"),
                'm' => Some("Mi"),
                'g' => Some("Gi"),
                _ => return Err(bad()),
            };
            let (slot, value) = match unit {
                None => (&mut parsed.cpu, canonical_cpu(number).ok_or_else(bad)?),
                Some(unit) => (&mut parsed.memory, format!("{number}{unit}")),
            };
            if slot.replace(value).is_some() {
                return Err(bad());
            }
        }
        Ok(parsed)
    }

    /// Whether no quota was given.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_none() && self.memory.is_none()
    }
}

/// Cores as the API server writes them back (Kubernetes `resource.Quantity`): whole cores
/// as a number, else millicores, rounded up as the API server does; `None` below 1m.
fn canonical_cpu(cores: &str) -> Option<String> {
    let millis = (cores.parse::<f64>().ok()? * 1000.0).ceil() as u64;
    match millis {
        0 => None,
        m if m % 1000 == 0 => Some((m / 1000).to_string()),
        m => Some(format!("{m}m")),
    }
}

/// `k1=v1,k2=v2` (ktctl's map flags); a malformed pair is named in the error.
pub fn parse_pairs(
    flag: &'static str,
    text: &str,
) -> Result<BTreeMap<String, String>, SettingsError> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(SettingsError::Pair {
                flag,
                pair: pair.to_owned(),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::args::Cli;

    fn settings(args: &[&str]) -> Result<Settings, SettingsError> {
        let cli =
            Cli::try_parse_from(std::iter::once("ktctl").chain(args.iter().copied())).unwrap();
        Settings::from_args(&cli.global)
    }

    #[test]
    fn map_flags_are_parsed_and_a_bad_pair_is_named() {
        let s = settings(&["-l", "team=a, tier=b", "--nodeSelector", "zone=x"]).unwrap();
        assert_eq!(s.shadow.labels.len(), 2);
        assert_eq!(s.shadow.node_selector["zone"], "x");
        let err = settings(&["--withAnnotation", "a=1,oops"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --withAnnotation 'oops', should be key=value"
        );
        assert!(settings(&["-l", "=v"]).is_err(), "an empty key is refused");
    }

    #[test]
    fn durations_transport_and_connections_are_kt_types() {
        let s = settings(&["--portForwardTimeout=3", "--transport", "direct"]).unwrap();
        assert_eq!(s.ssh.connect_timeout, Duration::from_secs(3));
        assert_eq!(s.ssh.transport, Transport::Direct);
        assert_eq!((s.ssh.connections, s.ssh.connections_given), (2, false));
        let s = settings(&["--sshConnections=4"]).unwrap();
        assert_eq!((s.ssh.connections, s.ssh.connections_given), (4, true));
        assert_eq!(s.shadow.creation_timeout, Duration::from_secs(60));
    }

    #[test]
    fn customised_shadow_flags_are_known() {
        assert!(settings(&[]).unwrap().shadow.customised.is_empty());
        let s = settings(&["-i", "mine", "-f", "--serviceAccount", "sa"]).unwrap();
        assert_eq!(
            s.shadow.customised,
            ["--image", "--serviceAccount", "--forceUpdate"]
        );
    }

    #[test]
    fn pod_quota_takes_v0_3_7_syntax_and_names_a_bad_part() {
        let quota = |q: &str| PodQuota::parse(q);
        assert_eq!(
            quota("0.5c,512m").unwrap(),
            PodQuota {
                cpu: Some("500m".into()),
                memory: Some("512Mi".into())
            }
        );
        assert_eq!(quota("2c").unwrap().cpu.as_deref(), Some("2"));
        assert_eq!(quota("1.25c").unwrap().cpu.as_deref(), Some("1250m"));
        assert_eq!(quota("2g").unwrap().memory.as_deref(), Some("2Gi"));
        assert_eq!(quota("100k").unwrap().memory.as_deref(), Some("100Ki"));
        assert!(quota("").unwrap().is_empty());
        assert!(quota(" ").unwrap().is_empty());
        for (bad, part) in [
            ("0.5c,lots", "lots"),
            ("512M", "512M"),
            ("1é", "1é"),
            ("-1c", "-1c"),
            ("c", "c"),
            ("0c", "0c"),
            (",", ""),
            ("1c,", ""),
            ("1c,2c", "2c"),
            ("1g,512m", "512m"),
        ] {
            let err = quota(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("'{part}'")), "{bad}: {err}");
        }
    }

    #[test]
    fn passwd_name_is_the_first_entry_with_the_uid() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nalice:x:1000:1000::/home/alice:/bin/sh\nalias:x:1000:1000::/:/bin/sh\n";
        assert_eq!(passwd_name(passwd, 0).as_deref(), Some("root"));
        assert_eq!(passwd_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(passwd_name(passwd, 1001), None);
        assert_eq!(passwd_name("", 0), None);
    }

    #[test]
    fn every_accepted_but_inert_flag_is_named_in_a_warning() {
        let cli = Cli::try_parse_from(["ktctl", "--asWorker"]).unwrap();
        let warnings = unimplemented_flags(&cli.global);
        assert!(
            warnings.iter().any(|w| w.starts_with("--asWorker")),
            "{warnings:?}"
        );
        let plain = Cli::try_parse_from(["ktctl"]).unwrap();
        assert!(unimplemented_flags(&plain.global).is_empty());
    }
}

//! The command line, as close to ktctl v0.3.7's as clap allows: camelCase long flags, the
//! same short forms and defaults, global flags accepted before or after a subcommand, and
//! cobra's boolean syntax (`--debug`, `--debug=true`, `--debug=false`).

use clap::{Args, CommandFactory as _, Parser};

/// The v0.3.7 router image (`--routerImage`'s default; kt's agent mode starts none).
pub const DEFAULT_ROUTER_IMAGE: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-router:v0.3.7";

/// The v0.3.7 shadow image: its OpenSSH contract is what ktctl speaks to by default.
pub const DEFAULT_SHADOW_IMAGE: &str =
    "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7";

/// `--image`'s help: v0.3.7's sentence, and kt's own shadow image (`kt_proto::images`, built
/// by tests/scripts/images.sh), which the default stays without for drop-in compatibility.
pub fn shadow_image_help() -> String {
    use kt_proto::images;
    format!(
        "Customize shadow image (kt's own: {})",
        images::reference(images::SHADOW)
    )
}

#[derive(Debug, Parser)]
#[command(
    name = "ktctl",
    about = "A utility tool to help you work with Kubernetes dev environment more efficiently",
    disable_version_flag = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Print the version number of ktctl
    #[arg(short = 'v', long = "version")]
    pub version: bool,

    #[command(flatten)]
    pub global: GlobalOptions,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a network tunnel to kubernetes cluster
    #[command(after_help = "Examples:
  sudo ktctl connect                         # then: curl http://nginx.default
  sudo ktctl connect --dnsMode hosts:default,dev
  sudo ktctl connect --excludeIps 10.96.5.0/24 --via shadow")]
    Connect(ConnectArgs),
    /// Redirect all requests of specified kubernetes service to local
    #[command(after_help = "Examples:
  ktctl exchange nginx --expose 80           # the service's port 80 -> local port 80
  ktctl exchange nginx --expose 8080:80 --mode selector
  ktctl exchange dns --expose 15353:53/udp   # the service's UDP port 53 -> local UDP 15353 (agent mode)")]
    Exchange(ExchangeArgs),
    /// Redirect marked requests of specified kubernetes service to local
    #[command(after_help = "Examples:
  ktctl mesh nginx --expose 80               # requests with header 'version: <printed>'
  ktctl mesh nginx --expose 80 --versionMark kt-version:alice
  ktctl mesh nginx --expose 80 --mode manual # a labelled shadow for Istio rules")]
    Mesh(MeshArgs),
    /// Expose a local service to kubernetes cluster
    #[command(after_help = "Examples:
  ktctl preview nginx-v2 --expose 80         # service nginx-v2:80 -> local port 80
  ktctl preview nginx-v2 --expose 8080:80 --external")]
    Preview(PreviewArgs),
    /// Redirect local port to a service or any remote address
    #[command(after_help = "Examples:
  ktctl forward nginx-v2 6060:80             # localhost:6060 -> port 80 of service nginx-v2
  ktctl forward nginx.dev:80                 # an address the cluster reaches")]
    Forward(ForwardArgs),
    /// Restore traffic of specified kubernetes service changed by exchange or mesh
    #[command(after_help = "Example:
  ktctl recover nginx                        # after a ktctl was killed mid-exchange")]
    Recover(RecoverArgs),
    /// Delete unavailing resources created by kt from kubernetes cluster
    #[command(after_help = "Examples:
  ktctl clean --dryRun                       # list what would be removed
  ktctl clean --thresholdInMinus 10")]
    Clean(CleanArgs),
    /// List, get or set default value for command options
    #[command(after_help = "Examples:
  ktctl config set connect.dns-mode hosts:default,dev
  ktctl config show --all
  ktctl config save-profile dev && ktctl config load-profile dev --dryRun")]
    Config(ConfigArgs),
    /// Show summary of services status in cluster
    #[command(after_help = "Example:
  ktctl birdseye --showConnector --sortBy name")]
    Birdseye(BirdseyeArgs),
    /// Generate the autocompletion script for the specified shell
    #[command(after_help = "Example: ktctl completion bash > /etc/bash_completion.d/ktctl")]
    Completion(CompletionArgs),
}

/// `ktctl recover <svc>`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The service (`name`, `svc/name`)
    pub service: String,
}

/// `ktctl clean` (v0.3.7 `options/clean.go`).
#[derive(Debug, Args)]
pub struct CleanArgs {
    /// Length of allowed disconnection time before a unavailing shadow pod be deleted
    #[arg(long = "thresholdInMinus", default_value_t = 5)]
    pub threshold_in_minus: u32,
    /// Only print name of deployments to be deleted
    #[arg(long = "dryRun", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub dry_run: bool,
    /// Only check and restore local changes made by kt
    #[arg(long = "localOnly", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub local_only: bool,
}

/// `ktctl birdseye` (v0.3.7 `options/birdseye.go`).
#[derive(Debug, Args)]
pub struct BirdseyeArgs {
    /// Sort by 'status' or 'name'
    #[arg(long = "sortBy", default_value = "status", value_parser = ["status", "name"])]
    pub sort_by: String,
    /// Also show users who are currently connecting to the cluster
    #[arg(long = "showConnector", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub show_connector: bool,
    /// Only show services which are exchanged, meshed or previewing
    #[arg(long = "hideNaturalService", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub hide_natural_service: bool,
}

/// `ktctl completion <shell>` (v0.3.7 has cobra's: bash, zsh, fish, powershell).
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to generate the script for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `ktctl config <sub>`: the defaults of every command's flags, kept in `~/.kt/config`
/// (ktctl v0.3.7 `command/config.go`). Its help hides the global flags, as v0.3.7's does.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Without one, the help is printed.
    #[command(subcommand)]
    pub action: Option<ConfigAction>,
}

/// The `config` subcommands, in v0.3.7's order.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigAction {
    /// Show the configured default values ('group.item = value')
    Show {
        /// Also list the items that are not set
        #[arg(short = 'a', long, value_name = "bool", value_parser = parse_bool,
              num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
        all: bool,
    },
    /// Print the configured default value of items
    Get {
        /// Items, '<group>.<item>' (e.g. 'connect.dns-mode')
        #[arg(required = true, value_name = "ITEM")]
        items: Vec<String>,
    },
    /// Set the default value of an item: '<item> <value>', '<item>=<value>' or
    /// '<item> = <value>' (a value starting with '-' goes after '--')
    Set {
        #[arg(required = true, num_args = 1..=3, value_name = "ITEM [=] VALUE")]
        args: Vec<String>,
    },
    /// Remove the configured default value of items
    Unset {
        /// Items, '<group>.<item>'
        #[arg(value_name = "ITEM")]
        items: Vec<String>,
        /// Remove all items
        #[arg(short = 'a', long, value_name = "bool", value_parser = parse_bool,
              num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
        all: bool,
    },
    /// List the saved profiles
    ListProfile,
    /// Save the current config as a profile (~/.kt/profile/<name>)
    SaveProfile {
        /// Letters, digits, '-', '_' and '.', not starting with '.'
        name: String,
        /// (kt's own) Overwrite an existing profile without asking; needed to overwrite one
        /// when stdin is not a terminal
        #[arg(long, value_name = "bool", value_parser = parse_bool,
              num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
        force: bool,
    },
    /// Replace the current config with a saved profile
    LoadProfile {
        name: String,
        /// Print the profile instead of loading it
        #[arg(long = "dryRun", value_name = "bool", value_parser = parse_bool,
              num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
        dry_run: bool,
    },
    /// Delete a saved profile
    DropProfile { name: String },
}

/// `ktctl connect` (v0.3.7's flags, in its order, then kt's).
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Connect mode 'tun2socks' or 'sshuttle'
    #[arg(long, default_value = "tun2socks")]
    pub mode: String,
    /// Specify how to resolve service domains, can be 'localDNS', 'podDNS', 'hosts' or
    /// 'hosts:<namespaces>', for multiple namespaces use ',' separation
    ///
    /// localDNS: where /etc/resolv.conf is systemd-resolved's stub file and resolvectl
    /// answers, kt's resolver is set for the TUN device kt0 only (resolvectl), so that
    /// resolved sends it only the cluster's names; otherwise (also with --disableTunDevice)
    /// /etc/resolv.conf is pointed at it, as ktctl v0.3.7 does.
    #[arg(long = "dnsMode", default_value = "localDNS")]
    pub dns_mode: String,
    /// Use shared shadow pod
    #[arg(long = "shareShadow", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub share_shadow: bool,
    /// The cluster domain provided to kubernetes api-server
    #[arg(long = "clusterDomain", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Disable access to pod IP address
    #[arg(long = "disablePodIp", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub disable_pod_ip: bool,
    /// Do not auto cleanup residual resources in cluster
    #[arg(long = "skipCleanup", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub skip_cleanup: bool,
    /// Specify extra IP ranges which should be route to cluster, e.g. '172.2.0.0/16', use ','
    /// separated
    #[arg(long = "includeIps", default_value = "")]
    pub include_ips: String,
    /// Do not route specified IPs to cluster, e.g. '192.168.64.2' or '192.168.64.0/24', use
    /// ',' separated
    #[arg(long = "excludeIps", default_value = "")]
    pub exclude_ips: String,
    /// Use specified ip for ingress access
    #[arg(long = "ingressIp", default_value = "")]
    pub ingress_ip: String,
    /// (tun2socks mode only) Create socks5 proxy without tun device
    #[arg(long = "disableTunDevice", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub disable_tun_device: bool,
    /// (tun2socks mode only) Do not auto setup tun device route
    #[arg(long = "disableTunRoute", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub disable_tun_route: bool,
    /// (tun2socks mode only) Specify the local port which socks5 proxy should use
    #[arg(long = "proxyPort", default_value_t = 2223)]
    pub proxy_port: u16,
    /// (tun2socks mode only) Specify the ip address to which socks5 proxy should bind
    #[arg(long = "proxyAddr", default_value = "127.0.0.1")]
    pub proxy_addr: String,
    /// (localDNS mode only) DNS cache refresh interval in seconds
    #[arg(long = "dnsCacheTtl", default_value_t = 60)]
    pub dns_cache_ttl: u32,
    // kt's own, after v0.3.7's.
    /// Where connections leave in the cluster: 'agent' (kt's node agent dials them; no pod is
    /// created), 'shadow' (a shadow pod, v0.3.7's way), or 'auto' (the agent when installed)
    #[arg(long, value_enum, default_value = "auto")]
    pub via: ConnectVia,
}

/// `connect --via`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectVia {
    Auto,
    Agent,
    Shadow,
}

/// `ktctl forward <svc|address> [local[:remote]]`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// A service (`name`, `svc/name`) or an address the cluster reaches (`10.1.2.3:80`,
    /// `name.namespace:80`)
    pub target: String,
    /// `local[:remote]`: the local port, and for a service the port to reach
    pub ports: Option<String>,
}

/// `ktctl exchange <svc> --expose local[:remote][,...]`.
#[derive(Debug, Args)]
pub struct ExchangeArgs {
    /// The service (`name`, `svc/name`), or with --mode ephemeral a pod (`pod/name`)
    pub service: String,
    /// Ports to expose, `port` or `local:remote` (comma separated); `remote` is the
    /// service's targetPort or, when no targetPort matches, its port. An item ending in
    /// `/udp` exposes the service's UDP port (agent mode only); without it, TCP (`/tcp`),
    /// and UDP on the same number stays with the pods
    #[arg(long, required = true)]
    pub expose: String,
    /// Exchange method: 'agent' (kt's node agent redirects the Service in the kernel;
    /// nothing in the cluster is changed), 'selector' (the Service selects a shadow pod,
    /// v0.3.7's default), 'scale' (the Deployment is scaled to zero while a shadow stands
    /// in for its pods), 'ephemeral' (an ephemeral container in each pod redirects the
    /// exposed ports to local, inside the pod; also for `pod/<name>`), or 'auto' (agent
    /// when the agent is installed, else selector)
    ///
    /// In agent mode one node's agent holds the tunnel: the one on the node with the most
    /// of the Service's ready endpoints, among equals the one holding the fewest live
    /// sessions, then the first by pod name (docs: architecture, "Which agent holds a
    /// session").
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: ExchangeMode,
    /// Do not check whether a local application listens on the exposed ports
    #[arg(long = "skipPortChecking", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub skip_port_checking: bool,
    /// (scale mode) Seconds to wait for the original pods to come back
    #[arg(long = "recoverWaitTime", default_value_t = 120)]
    pub recover_wait_time: u32,
    /// (selector and scale modes) Go ahead although Service ports that are not exposed will
    /// stop answering while the exchange lasts (the shadow serves only the exposed ports)
    #[arg(long = "allowUnservedPorts", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub allow_unserved_ports: bool,
}

/// `ktctl mesh <svc> --expose local[:remote][,...]`.
#[derive(Debug, Args)]
pub struct MeshArgs {
    /// The service (`name`, `svc/name`)
    pub service: String,
    /// Ports to expose, `port` or `local:remote` (comma separated); `remote` is the
    /// service's targetPort or, when no targetPort matches, its port
    #[arg(long, required = true)]
    pub expose: String,
    /// Mesh method: 'agent' (kt's node agent routes each request by its header: HTTP/1.1,
    /// HTTP/2, gRPC, WebSocket; nothing in the cluster is changed), 'auto' (the agent when
    /// installed, else v0.3.7's router pod in front of the Service's pods), 'manual'
    /// (v0.3.7's: a shadow labelled '<key>=<value>' joins the Service's pods, for a service
    /// mesh's rules)
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: MeshMode,
    /// The header requests carry to reach this workstation: 'value', 'key:' or 'key:value'
    /// (key default 'version', a lower-case header name; value default 5 random letters)
    #[arg(long = "versionMark", default_value = "")]
    pub version_mark: String,
    /// Do not check whether a local application listens on the exposed ports
    #[arg(long = "skipPortChecking", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub skip_port_checking: bool,
    /// (auto mode without the agent) The router pod's image; agent mode starts no router pod
    #[arg(long = "routerImage", default_value = DEFAULT_ROUTER_IMAGE)]
    pub router_image: String,
}

/// `ktctl preview <name> --expose port[:remote][,...]`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The name of the Service to create (it must not exist)
    pub name: String,
    /// Ports to publish, `port` or `local:remote` (comma separated): local port `local`
    /// becomes port `remote` of the Service
    #[arg(long, required = true)]
    pub expose: String,
    /// Create a LoadBalancer Service (reachable from outside the cluster where the cluster
    /// provides load balancers)
    #[arg(long, value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub external: bool,
    /// Do not check whether a local application listens on the exposed ports
    #[arg(long = "skipPortChecking", value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub skip_port_checking: bool,
    /// Preview method: 'agent' (kt's node agent holds the session; the Service points at its
    /// listener), 'shadow' (a shadow pod with reverse tunnels, v0.3.7's way), or 'auto' (the
    /// agent when installed)
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: PreviewMode,
}

/// `preview --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PreviewMode {
    Auto,
    Agent,
    Shadow,
}

/// `mesh --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MeshMode {
    Auto,
    Agent,
    Manual,
}

/// `exchange --mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExchangeMode {
    Auto,
    Agent,
    Selector,
    Scale,
    Ephemeral,
}

/// The root's persistent flags (ktctl v0.3.7 `options/global.go`), in its order.
#[derive(Debug, Clone, Args)]
pub struct GlobalOptions {
    /// Specify target namespace (otherwise follow kubeconfig current context)
    #[arg(short = 'n', long = "namespace", global = true)]
    pub namespace: Option<String>,

    /// Specify path of KubeConfig file
    #[arg(short = 'c', long = "kubeconfig", global = true, default_value = "")]
    pub kubeconfig: String,

    /// Specify current context of kubeconfig
    #[arg(long = "context", global = true, default_value = "")]
    pub context: String,

    /// The shadow pods' image; v0.3.7's by default (help text: [`shadow_image_help`])
    #[arg(short = 'i', long = "image", global = true, default_value = DEFAULT_SHADOW_IMAGE, help = shadow_image_help())]
    pub image: String,

    /// Custom image pull secret
    #[arg(long = "imagePullSecret", global = true, default_value = "")]
    pub image_pull_secret: String,

    /// Specify ServiceAccount name for shadow pod
    #[arg(long = "serviceAccount", global = true, default_value = "default")]
    pub service_account: String,

    /// Specify node selector for shadow pod, e.g. 'k1=v1,k2=v2'
    #[arg(long = "nodeSelector", global = true, default_value = "")]
    pub node_selector: String,

    /// Print debug log
    #[arg(short = 'd', long = "debug", global = true, value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub debug: bool,

    /// Extra labels on shadow pod e.g. 'label1=val1,label2=val2'
    #[arg(short = 'l', long = "withLabel", global = true, default_value = "")]
    pub with_label: String,

    /// Extra annotation on shadow pod e.g. 'annotation1=val1,annotation2=val2'
    #[arg(long = "withAnnotation", global = true, default_value = "")]
    pub with_annotation: String,

    /// Seconds to wait before port-forward connection timeout
    #[arg(long = "portForwardTimeout", global = true, default_value_t = 10)]
    pub port_forward_timeout: u32,

    /// Seconds to wait before shadow or router pod creation timeout
    #[arg(long = "podCreationTimeout", global = true, default_value_t = 60)]
    pub pod_creation_timeout: u32,

    /// Deploy shadow container as deployment
    #[arg(long = "useShadowDeployment", global = true, value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub use_shadow_deployment: bool,

    /// Use local time (instead of cluster time) for resource heartbeat timestamp
    #[arg(long = "useLocalTime", global = true, value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub use_local_time: bool,

    /// Always update shadow image
    #[arg(short = 'f', long = "forceUpdate", global = true, value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub force_update: bool,

    /// Hidden and unused, accepted for compatibility with v0.3.7 scripts
    #[arg(long = "asWorker", global = true, hide = true, value_name = "bool", value_parser = parse_bool,
          num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true")]
    pub as_worker: bool,

    /// Specify resource limit for shadow and router pod, e.g. '0.5c,512m'
    #[arg(long = "podQuota", global = true, default_value = "")]
    pub pod_quota: String,

    // kt's own flags, after v0.3.7's.
    /// How to reach the shadow's or agent's SSH port: 'auto' (straight to the pod when its
    /// address is reachable from here, else through the API server), 'direct' or
    /// 'portForward'
    #[arg(long = "transport", global = true, value_enum, default_value = "auto")]
    pub transport: TransportArg,

    /// SSH connections per session for `forward`; parallel connections are spread over them
    /// [default: 2] (`exchange` carries its reverse tunnels on one)
    #[arg(long = "sshConnections", global = true,
          value_parser = clap::value_parser!(u8).range(1..=16))]
    pub ssh_connections: Option<u8>,
}

/// `--transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    Auto,
    Direct,
    #[value(name = "portForward")]
    PortForward,
}

/// The clap command, for help rendering and parsing.
pub fn command() -> clap::Command {
    finish(Cli::command())
}

/// `command` (kt's [`Cli::command`], maybe with configured defaults) as ktctl presents it:
/// `config`'s help hides the global flags, as v0.3.7's does. Hidden copies of them on
/// `config` keep them accepted there (clap propagates a global flag only to subcommands
/// that lack an argument of that id).
pub fn finish(command: clap::Command) -> clap::Command {
    let globals: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| arg.is_global_set())
        .map(|arg| arg.clone().hide(true))
        .collect();
    command.mut_subcommand("config", |config| config.args(globals))
}

/// Booleans as Go's `strconv.ParseBool` (what cobra uses) accepts them.
pub(crate) fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("invalid boolean value '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ktctl").chain(args.iter().copied()))
    }

    #[test]
    fn image_help_names_kts_shadow_and_the_default_stays_v0_3_7s() {
        let help = Cli::command().render_help().to_string();
        let shadow = kt_proto::images::reference(kt_proto::images::SHADOW);
        assert!(help.contains(&shadow), "{help}");
        assert!(help.contains(DEFAULT_SHADOW_IMAGE), "{help}");
    }

    #[test]
    fn defaults_match_v0_3_7() {
        let g = parse(&[]).unwrap().global;
        assert_eq!(g.namespace, None);
        assert_eq!(g.image, DEFAULT_SHADOW_IMAGE);
        assert_eq!(g.service_account, "default");
        assert_eq!((g.port_forward_timeout, g.pod_creation_timeout), (10, 60));
        assert!(!g.debug && !g.use_shadow_deployment && !g.use_local_time && !g.force_update);
        assert_eq!((g.transport, g.ssh_connections), (TransportArg::Auto, None));
    }

    #[test]
    fn kt_transport_flags_take_their_values_and_refuse_others() {
        let g = parse(&["--transport", "portForward", "--sshConnections=4"])
            .unwrap()
            .global;
        assert_eq!(
            (g.transport, g.ssh_connections),
            (TransportArg::PortForward, Some(4))
        );
        assert!(parse(&["--sshConnections=0"]).is_err());
        let err = parse(&["--transport", "carrier-pigeon"]).unwrap_err();
        assert!(err.to_string().contains("carrier-pigeon"), "{err}");
    }

    #[test]
    fn short_forms_and_values() {
        let g = parse(&[
            "-n", "dev", "-c", "/k", "-i", "img", "-d", "-l", "a=b", "-f",
        ])
        .unwrap()
        .global;
        assert_eq!(g.namespace.as_deref(), Some("dev"));
        assert_eq!(
            (
                g.kubeconfig.as_str(),
                g.image.as_str(),
                g.with_label.as_str()
            ),
            ("/k", "img", "a=b")
        );
        assert!(g.debug && g.force_update);
    }

    #[test]
    fn booleans_take_cobra_syntax() {
        assert!(parse(&["--debug=true"]).unwrap().global.debug);
        assert!(!parse(&["--debug=false"]).unwrap().global.debug);
        assert!(!parse(&["--useLocalTime=F"]).unwrap().global.use_local_time);
        assert!(parse(&["--useLocalTime=1"]).unwrap().global.use_local_time);
        let err = parse(&["--debug=maybe"]).unwrap_err();
        assert!(err.to_string().contains("maybe"), "{err}");
    }

    #[test]
    fn camel_case_long_flags_with_values() {
        let g = parse(&[
            "--podCreationTimeout",
            "5",
            "--portForwardTimeout=3",
            "--nodeSelector=a=b",
        ])
        .unwrap()
        .global;
        assert_eq!((g.pod_creation_timeout, g.port_forward_timeout), (5, 3));
        assert_eq!(g.node_selector, "a=b");
        assert!(parse(&["--podCreationTimeout", "soon"]).is_err());
    }

    #[test]
    fn recover_clean_and_birdseye_take_v0_3_7_flags() {
        let Some(Command::Clean(clean)) = parse(&["clean", "--thresholdInMinus", "15", "--dryRun"])
            .unwrap()
            .command
        else {
            panic!("clean parses");
        };
        assert_eq!(
            (clean.threshold_in_minus, clean.dry_run, clean.local_only),
            (15, true, false)
        );
        let Some(Command::Birdseye(b)) = parse(&["birdseye"]).unwrap().command else {
            panic!("birdseye parses");
        };
        assert_eq!(
            (b.sort_by.as_str(), b.show_connector, b.hide_natural_service),
            ("status", false, false)
        );
        assert!(parse(&["birdseye", "--sortBy", "age"]).is_err());
        assert!(parse(&["recover"]).is_err(), "recover needs its service");
        assert!(
            matches!(parse(&["recover", "svc/web"]).unwrap().command, Some(Command::Recover(r)) if r.service == "svc/web")
        );
    }

    #[test]
    fn version_has_v_short_form() {
        assert!(parse(&["-v"]).unwrap().version);
        assert!(parse(&["--version"]).unwrap().version);
    }
}

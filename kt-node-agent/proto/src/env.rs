//! Every environment variable the node agent's roles read. `deploy/base/daemonset.yaml` sets
//! some of them, ktctl sets the shadow's (v0.3.7 contract), and the binaries read them
//! through clap (`#[arg(env = …)]`); a test checks `deploy/` names only these.

/// Role `agent`: this node's name (downward API `spec.nodeName`). Required.
pub const NODE_NAME: &str = "KT_NODE_NAME";
/// Role `agent`: this node's address (downward API `status.hostIP`), where the tunnel
/// listeners of the sessions it holds are reached. Required.
pub const NODE_IP: &str = "KT_NODE_IP";
/// Role `agent`: address of the SSH server that holds sessions (default `0.0.0.0:9922`).
pub const AGENT_SSH: &str = "KT_AGENT_SSH";
/// Role `agent`: address of `/healthz`, `/readyz` and `/metrics` (default `0.0.0.0:9966`).
pub const AGENT_HTTP: &str = "KT_AGENT_HTTP";
/// Role `agent`: the pods' cgroup2 directory (detected when unset).
pub const AGENT_CGROUP: &str = "KT_AGENT_CGROUP";
/// Role `agent`: address ranges `connect` sessions may reach besides the cluster's pods and
/// Services, comma separated.
pub const EGRESS_ALLOW: &str = "KT_AGENT_EGRESS_ALLOW";
/// Role `agent`: seconds a session nobody holds stays before the agents delete it (default
/// 300; preview sessions go after their lease).
pub const SESSION_GRACE: &str = "KT_AGENT_SESSION_GRACE";
/// Role `agent`: seconds a UDP flow of an exchange (one pod address and port) lives
/// without a datagram either way before its channel to the workstation is closed
/// (default 60).
pub const UDP_FLOW_IDLE: &str = "KT_AGENT_UDP_FLOW_IDLE";
/// Every role: a `tracing` filter directive (`info`, `kt_node_agent=debug`, …).
pub const LOG: &str = "KT_AGENT_LOG";
/// Every role: `text` (default) or `json` log lines.
pub const LOG_FORMAT: &str = "KT_LOG_FORMAT";

/// Role `shadow`: address of the SSH server (default `0.0.0.0:22`).
pub const SHADOW_LISTEN: &str = "KT_SHADOW_LISTEN";
/// Role `shadow`: authorized keys file(s) (default the v0.3.7 mount,
/// `/root/authorized/authorized_keys`).
pub const SHADOW_AUTHORIZED_KEYS: &str = "KT_SHADOW_AUTHORIZED_KEYS";
/// Role `shadow`, ktctl v0.3.7: relay cluster DNS over `tcp` or `udp` (set by `connect`).
pub const DNS_PROTOCOL: &str = "KT_DNS_PROTOCOL";
/// Role `shadow`: address of the DNS relay (default `0.0.0.0:53`).
pub const DNS_LISTEN: &str = "KT_DNS_LISTEN";
/// Role `shadow`, ktctl v0.3.7: the workstation's search domains, comma separated.
pub const LOCAL_DOMAIN: &str = "KT_LOCAL_DOMAIN";
/// Role `shadow`, ktctl v0.3.7: `debug` or `info`; the log level when [`LOG`] is unset.
pub const LOG_LEVEL: &str = "KT_LOG_LEVEL";

/// Role `navigator` (`exchange --mode ephemeral`): address of its SSH server in the pod.
pub const NAVIGATOR_LISTEN: &str = "KT_NAVIGATOR_LISTEN";
/// Role `navigator`: the session's public key(s), OpenSSH lines (an ephemeral container
/// cannot mount a new volume, so the key comes in its environment).
pub const AUTHORIZED_KEYS: &str = "KT_AUTHORIZED_KEYS";

/// Every name above.
pub const ALL: [&str; 18] = [
    NODE_NAME,
    NODE_IP,
    AGENT_SSH,
    AGENT_HTTP,
    AGENT_CGROUP,
    EGRESS_ALLOW,
    SESSION_GRACE,
    UDP_FLOW_IDLE,
    LOG,
    LOG_FORMAT,
    SHADOW_LISTEN,
    SHADOW_AUTHORIZED_KEYS,
    DNS_PROTOCOL,
    DNS_LISTEN,
    LOCAL_DOMAIN,
    LOG_LEVEL,
    NAVIGATOR_LISTEN,
    AUTHORIZED_KEYS,
];

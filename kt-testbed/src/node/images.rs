//! Image names → programs on this machine. The testbed has no container runtime: an image
//! is a program the kubelet runs in the pod's namespaces. An unknown image ends in
//! ImagePullBackOff, as in a cluster.

use std::path::PathBuf;

use serde_json::Value;

#[derive(Clone, Debug)]
pub struct Catalog {
    /// The `kt-testbed` binary (test servers, cluster DNS, the pod runner).
    pub testbed_bin: PathBuf,
    /// The `kt-node-agent` binary, when built.
    pub agent_bin: Option<PathBuf>,
}

/// `registry:5000/a/b:tag@sha256:…` → `a/b` (registry host dropped when it has a dot or a
/// port, as Docker parses names).
pub fn repository(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let (name, _tag) = match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, ""),
    };
    match name.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest.to_owned()
        }
        _ => name.to_owned(),
    }
}

impl Catalog {
    /// The entrypoint of an image, if the testbed knows it.
    fn entrypoint(&self, image: &str) -> Option<Vec<String>> {
        let repo = repository(image);
        let testbed = |name: &str| {
            Some(vec![
                self.testbed_bin.display().to_string(),
                "image".into(),
                name.into(),
            ])
        };
        match repo.as_str() {
            "kt-testbed/http-echo" => testbed("http-echo"),
            "kt-testbed/tcp-echo" => testbed("tcp-echo"),
            "kt-testbed/udp-echo" => testbed("udp-echo"),
            "kt-testbed/dns" => testbed("dns"),
            "kt-testbed/sleep" | "busybox" | "library/busybox" | "pause" => testbed("sleep"),
            // The ktctl v0.3.7 shadow image: OpenSSH under the shadow contract.
            r if r.ends_with("kt-connect-shadow") => {
                let mut argv = testbed("openssh-shadow")?;
                if let Some(agent) = &self.agent_bin {
                    argv.extend(["--dns-relay".into(), agent.display().to_string()]);
                }
                Some(argv)
            }
            // kt's own shadow: the agent binary in role `shadow`.
            r if r.ends_with("kt-shadow") => self
                .agent_bin
                .as_ref()
                .map(|p| vec![p.display().to_string(), "shadow".into()]),
            r if r.ends_with("kt-node-agent") => self
                .agent_bin
                .as_ref()
                .map(|p| vec![p.display().to_string()]),
            _ => None,
        }
    }

    /// The argv a container runs: `command` replaces the entrypoint (it names a program on
    /// this machine), `args` follow either.
    pub fn argv(&self, container: &Value) -> Option<Vec<String>> {
        let list = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        };
        let entry = self.entrypoint(container["image"].as_str().unwrap_or_default())?;
        let command = list(&container["command"]);
        let mut argv = if command.is_empty() { entry } else { command };
        argv.extend(list(&container["args"]));
        Some(argv)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn repository_names() {
        assert_eq!(repository("kt-testbed/http-echo:1"), "kt-testbed/http-echo");
        assert_eq!(
            repository("registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7"),
            "rdc-incubator/kt-connect-shadow"
        );
        assert_eq!(
            repository("localhost:5000/kt-node-agent@sha256:abc"),
            "kt-node-agent"
        );
        assert_eq!(repository("busybox"), "busybox");
    }

    #[test]
    fn command_replaces_the_entrypoint() {
        let c = Catalog {
            testbed_bin: "/bin/kt-testbed".into(),
            agent_bin: None,
        };
        assert_eq!(
            c.argv(&json!({"image": "kt-testbed/http-echo", "args": ["--x"]}))
                .unwrap(),
            ["/bin/kt-testbed", "image", "http-echo", "--x"]
        );
        assert_eq!(
            c.argv(&json!({"image": "busybox", "command": ["tail", "-f", "/dev/null"]}))
                .unwrap(),
            ["tail", "-f", "/dev/null"]
        );
        assert!(c.argv(&json!({"image": "nginx:1.21"})).is_none());
        let shadow = json!({"image": "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7"});
        assert_eq!(
            c.argv(&shadow).unwrap(),
            ["/bin/kt-testbed", "image", "openssh-shadow"]
        );
        assert!(
            c.argv(&json!({"image": "kt-node-agent:dev"})).is_none(),
            "no agent binary configured"
        );
    }
}

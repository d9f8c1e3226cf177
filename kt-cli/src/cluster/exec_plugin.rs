//! Exec credential plugins (`users[].user.exec` in a kubeconfig: `aws eks get-token`,
//! `gke-gcloud-auth-plugin`, `kubelogin`), run as client-go runs them (Kubernetes docs,
//! "client-go credential plugins"; `client-go/plugin/pkg/client/auth/exec`):
//!
//! - the plugin gets `KUBERNETES_EXEC_INFO` (an `ExecCredential` with `spec.interactive`,
//!   and `spec.cluster` with `provideClusterInfo`), the kubeconfig's `args` and `env`, and
//!   the terminal's stdin when interactive; its stderr goes to the user's terminal;
//! - it prints an `ExecCredential` of the kubeconfig's `apiVersion` whose `status.token` is
//!   sent as a bearer token;
//! - the token is kept until its `status.expirationTimestamp` (for the whole run without
//!   one), then the plugin runs again; a `401 Unauthorized` answer to a request made with
//!   the kept token drops it, so the next request runs the plugin again.
//!
//! kube-rs 5 runs plugins too, but refreshes whenever less than 60 s are left (a plugin
//! issuing short-lived tokens runs on every request), never on a 401, and leaves a failing
//! plugin's stderr out of its error; kt runs them itself ([`ExecPlugin`], [`ExecAuthLayer`]).
//! One difference from client-go: kt renews [`RENEW_BEFORE`] ahead of the expiry, so that a
//! request sent just before it does not reach the API server just after it.

use std::{
    future::Future,
    pin::Pin,
    process::Stdio,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use chrono::{DateTime, Utc};
use kube::config::{ExecConfig, ExecInteractiveMode};
use tokio::io::AsyncBufReadExt as _;

/// How long before its expiry a token is renewed.
pub const RENEW_BEFORE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ExecPluginError {
    #[error("the kubeconfig's exec plugin has no command")]
    NoCommand,
    #[error("exec plugin '{command}' could not be started{hint}")]
    Start {
        command: String,
        /// `: <installHint>` when the kubeconfig has one.
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exec plugin '{command}' failed with {status}{stderr}")]
    Failed {
        command: String,
        status: String,
        /// `: <first line of its stderr>`, or empty.
        stderr: String,
    },
    #[error("exec plugin '{command}' printed no ExecCredential: {reason}")]
    Output { command: String, reason: String },
    #[error(
        "exec plugin '{command}' returned apiVersion '{got}', the kubeconfig asks for '{want}'"
    )]
    Version {
        command: String,
        got: String,
        want: String,
    },
    #[error(
        "exec plugin '{command}' returned a client certificate: kt takes tokens from plugins only"
    )]
    Certificate { command: String },
    #[error("exec plugin '{command}' returned expirationTimestamp '{value}', not an RFC 3339 time")]
    Expiry { command: String, value: String },
}

/// A token from a plugin and when it stops being valid (`None`: for the whole run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub token: String,
    pub expires: Option<DateTime<Utc>>,
}

impl Credential {
    /// Whether it may still be sent at `now`.
    pub fn fresh(&self, now: DateTime<Utc>) -> bool {
        let renew = chrono::TimeDelta::from_std(RENEW_BEFORE).unwrap_or_default();
        self.expires.is_none_or(|expires| now + renew < expires)
    }
}

/// Parses a plugin's stdout (JSON; client-go's decoder also takes YAML) into a credential,
/// checking its `apiVersion` against `want` as client-go does.
pub fn parse_credential(
    command: &str,
    want: Option<&str>,
    stdout: &[u8],
) -> Result<Credential, ExecPluginError> {
    let output = |reason: String| ExecPluginError::Output {
        command: command.to_owned(),
        reason,
    };
    let text = String::from_utf8_lossy(stdout);
    if text.trim().is_empty() {
        return Err(output("its output is empty".into()));
    }
    let value: serde_json::Value =
        serde_yaml::from_str(&text).map_err(|e| output(e.to_string()))?;
    if value["kind"].as_str() != Some("ExecCredential") {
        return Err(output(format!(
            "kind is {}, not ExecCredential",
            value["kind"]
        )));
    }
    let got = value["apiVersion"].as_str().unwrap_or_default();
    if let Some(want) = want
        && got != want
    {
        return Err(ExecPluginError::Version {
            command: command.to_owned(),
            got: got.to_owned(),
            want: want.to_owned(),
        });
    }
    let status = &value["status"];
    if status["clientCertificateData"].is_string() {
        return Err(ExecPluginError::Certificate {
            command: command.to_owned(),
        });
    }
    let token = status["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| output("status.token is missing".into()))?;
    let expires = match status["expirationTimestamp"].as_str() {
        None => None,
        Some(value) => Some(
            DateTime::parse_from_rfc3339(value)
                .map_err(|_| ExecPluginError::Expiry {
                    command: command.to_owned(),
                    value: value.to_owned(),
                })?
                .with_timezone(&Utc),
        ),
    };
    Ok(Credential {
        token: token.to_owned(),
        expires,
    })
}

/// The `KUBERNETES_EXEC_INFO` a plugin gets.
fn exec_info(config: &ExecConfig, interactive: bool) -> String {
    let mut spec = serde_json::json!({"interactive": interactive});
    if config.provide_cluster_info
        && let Some(cluster) = &config.cluster
        && let Ok(cluster) = serde_json::to_value(cluster)
    {
        spec["cluster"] = cluster;
    }
    serde_json::json!({
        "apiVersion": config.api_version.as_deref().unwrap_or("client.authentication.k8s.io/v1"),
        "kind": "ExecCredential",
        "spec": spec,
    })
    .to_string()
}

/// A kubeconfig's exec plugin with its current credential (shared by every clone).
#[derive(Clone)]
pub struct ExecPlugin {
    shared: Arc<Shared>,
}

struct Shared {
    config: ExecConfig,
    command: String,
    cached: tokio::sync::Mutex<Option<Credential>>,
}

impl ExecPlugin {
    pub fn new(config: ExecConfig) -> Result<Self, ExecPluginError> {
        let command = config
            .command
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or(ExecPluginError::NoCommand)?;
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                command,
                cached: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The token to send now: the kept one while fresh, else a new one from the plugin
    /// (one run at a time, whatever the number of requests waiting).
    pub async fn token(&self) -> Result<String, ExecPluginError> {
        let mut cached = self.shared.cached.lock().await;
        if let Some(credential) = cached.as_ref()
            && credential.fresh(Utc::now())
        {
            return Ok(credential.token.clone());
        }
        let credential = self.run().await?;
        tracing::info!(
            command = %self.shared.command,
            expires = ?credential.expires,
            "exec plugin issued a credential"
        );
        let token = credential.token.clone();
        *cached = Some(credential);
        Ok(token)
    }

    /// The API server refused `token` (401): forget it if it is still the kept one.
    pub async fn unauthorized(&self, token: &str) {
        let mut cached = self.shared.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == token) {
            tracing::info!(command = %self.shared.command, "401 Unauthorized: the exec plugin will run again");
            *cached = None;
        }
    }

    async fn run(&self) -> Result<Credential, ExecPluginError> {
        let config = &self.shared.config;
        let command = &self.shared.command;
        // SAFETY: isatty reads the descriptor's state only.
        let terminal = unsafe { libc::isatty(0) } == 1;
        let interactive = config.interactive_mode != Some(ExecInteractiveMode::Never) && terminal;
        let mut cmd = tokio::process::Command::new(command);
        cmd.args(config.args.iter().flatten());
        for pair in config.env.iter().flatten() {
            if let (Some(name), Some(value)) = (pair.get("name"), pair.get("value")) {
                cmd.env(name, value);
            }
        }
        for name in config.drop_env.iter().flatten() {
            cmd.env_remove(name);
        }
        cmd.env("KUBERNETES_EXEC_INFO", exec_info(config, interactive))
            .stdin(if interactive {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| ExecPluginError::Start {
            command: command.clone(),
            hint: config
                .install_hint
                .as_deref()
                .map(|h| format!(": {}", h.trim()))
                .unwrap_or_default(),
            source,
        })?;
        // stderr passes through to the user (prompts of interactive plugins), its first
        // line kept for the error.
        let stderr = child.stderr.take().map(|stderr| {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                let mut first = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("{line}");
                    if first.is_none() && !line.trim().is_empty() {
                        first = Some(line);
                    }
                }
                first
            })
        });
        let output = child
            .wait_with_output()
            .await
            .map_err(|source| ExecPluginError::Start {
                command: command.clone(),
                hint: String::new(),
                source,
            })?;
        let first_stderr_line = match stderr {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        if !output.status.success() {
            return Err(ExecPluginError::Failed {
                command: command.clone(),
                status: match output.status.code() {
                    Some(code) => format!("exit code {code}"),
                    None => output.status.to_string(),
                },
                stderr: first_stderr_line
                    .map(|l| format!(": {}", l.trim()))
                    .unwrap_or_default(),
            });
        }
        parse_credential(command, config.api_version.as_deref(), &output.stdout)
    }
}

/// A tower layer adding the plugin's bearer token to every request ([`ExecAuth`]).
#[derive(Clone)]
pub struct ExecAuthLayer(pub ExecPlugin);

impl<S> tower::Layer<S> for ExecAuthLayer {
    type Service = ExecAuth<S>;

    fn layer(&self, inner: S) -> ExecAuth<S> {
        ExecAuth {
            inner,
            plugin: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ExecAuth<S> {
    inner: S,
    plugin: ExecPlugin,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B, R> tower::Service<http::Request<B>> for ExecAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<R>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The service polled ready is the one to call; a fresh clone stays behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let plugin = self.plugin.clone();
        Box::pin(async move {
            let token = plugin.token().await?;
            let mut value = http::HeaderValue::try_from(format!("Bearer {token}"))?;
            value.set_sensitive(true);
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value);
            let response = inner.call(request).await.map_err(Into::into)?;
            if response.status() == http::StatusCode::UNAUTHORIZED {
                plugin.unauthorized(&token).await;
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "client.authentication.k8s.io/v1";

    #[test]
    fn a_credential_with_an_expiry_is_kept_until_shortly_before_it() {
        let json = br#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",
            "status":{"token":"abc","expirationTimestamp":"2030-01-01T00:00:10Z"}}"#;
        let credential = parse_credential("p", Some(V1), json).unwrap();
        assert_eq!(credential.token, "abc");
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        assert!(credential.fresh(at("2030-01-01T00:00:08Z")));
        assert!(!credential.fresh(at("2030-01-01T00:00:09.5Z")));
        assert!(!credential.fresh(at("2030-01-01T00:00:11Z")));
        let forever = parse_credential(
            "p",
            Some(V1),
            b"apiVersion: client.authentication.k8s.io/v1\nkind: ExecCredential\nstatus: {token: t}\n",
        )
        .unwrap();
        assert!(forever.fresh(at("2100-01-01T00:00:00Z")));
    }

    #[test]
    fn bad_plugin_output_names_the_plugin_and_the_problem() {
        let err = |out: &[u8]| {
            parse_credential("/bin/p", Some(V1), out)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(b""),
            "exec plugin '/bin/p' printed no ExecCredential: its output is empty"
        );
        assert!(err(b"{not json").starts_with("exec plugin '/bin/p' printed no ExecCredential: "));
        assert_eq!(
            err(br#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","status":{"token":"t"}}"#),
            "exec plugin '/bin/p' returned apiVersion 'client.authentication.k8s.io/v1beta1', the kubeconfig asks for 'client.authentication.k8s.io/v1'"
        );
        assert_eq!(
            err(br#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{}}"#),
            "exec plugin '/bin/p' printed no ExecCredential: status.token is missing"
        );
        assert_eq!(
            err(br#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"t","expirationTimestamp":"soon"}}"#),
            "exec plugin '/bin/p' returned expirationTimestamp 'soon', not an RFC 3339 time"
        );
    }

    fn plugin(script: &str) -> (ExecPlugin, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kt-exec-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plugin");
        std::fs::write(&path, script).unwrap();
        let config: ExecConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": V1,
            "command": "sh",
            "args": [path.to_str().unwrap(), dir.join("runs").to_str().unwrap()],
            "interactiveMode": "Never",
        }))
        .unwrap();
        (ExecPlugin::new(config).unwrap(), dir)
    }

    #[tokio::test]
    async fn the_plugin_runs_again_after_expiry_and_after_a_401() {
        let script = r#"echo x >> "$1"; n=$(wc -l < "$1");
            case "$KUBERNETES_EXEC_INFO" in *'"interactive":false'*) ;; *) exit 3;; esac
            if [ "$n" = 1 ]; then exp=$(date -u -d '+1 second' +%Y-%m-%dT%H:%M:%SZ); else exp=2100-01-01T00:00:00Z; fi
            printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"t%s","expirationTimestamp":"%s"}}' "$n" "$exp""#;
        let (plugin, dir) = plugin(script);
        // The first token expires within RENEW_BEFORE: the next request runs the plugin.
        assert_eq!(plugin.token().await.unwrap(), "t1");
        assert_eq!(plugin.token().await.unwrap(), "t2");
        assert_eq!(plugin.token().await.unwrap(), "t2");
        plugin.unauthorized("t1").await; // an old token: nothing to drop
        assert_eq!(plugin.token().await.unwrap(), "t2");
        plugin.unauthorized("t2").await;
        assert_eq!(plugin.token().await.unwrap(), "t3");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn the_layer_sends_the_token_and_a_401_makes_the_next_request_run_the_plugin() {
        use tower::{Layer as _, ServiceExt as _};
        let script = r#"echo x >> "$1"; n=$(wc -l < "$1");
            printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"t%s"}}' "$n""#;
        let (plugin, dir) = plugin(script);
        // The API server: accepts t2 only.
        let server = tower::service_fn(|request: http::Request<()>| async move {
            let auth = request.headers()[http::header::AUTHORIZATION].clone();
            let status = if auth == "Bearer t2" { 200 } else { 401 };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder().status(status).body(()).unwrap(),
            )
        });
        let client = ExecAuthLayer(plugin).layer(server);
        let status = |client: ExecAuth<_>| async move {
            client
                .oneshot(http::Request::new(()))
                .await
                .unwrap()
                .status()
                .as_u16()
        };
        assert_eq!(status(client.clone()).await, 401);
        assert_eq!(status(client.clone()).await, 200);
        assert_eq!(status(client.clone()).await, 200);
        let runs = std::fs::read_to_string(dir.join("runs")).unwrap();
        assert_eq!(runs.lines().count(), 2, "one run per token");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_failing_plugin_is_reported_with_its_first_stderr_line() {
        let (plugin, dir) = plugin("echo 'token expired, run: login' >&2; echo more >&2; exit 2");
        let err = plugin.token().await.unwrap_err().to_string();
        assert_eq!(
            err,
            "exec plugin 'sh' failed with exit code 2: token expired, run: login"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

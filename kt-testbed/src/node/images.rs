//! Image names → what a container runs. The testbed has no container runtime and pods share
//! this machine's file system: an image is a program the kubelet runs in the pod's
//! namespaces, the `PATH` it sets, and the directories of the image a container writes to,
//! which each container gets a copy of. An unknown image, or one whose program this machine
//! lacks, ends in ImagePullBackOff, as in a cluster.
//!
//! Besides the test images and kt's own, the images of tutorials run: `nginx` (any tag, so
//! `nginx:alpine` too) is Debian's nginx with the official image's configuration and files;
//! `busybox` and `alpine` are a shell with this machine's tools, busybox's applets filling
//! in those it lacks; `curlimages/curl` is curl behind that image's entrypoint.

use std::{
    io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use serde_json::Value;

use crate::node::runner::BindMount;

/// The `PATH` of an image with no programs but its entrypoint (`FROM scratch`): a directory
/// that does not exist, so a program the container looks up by name is not found.
pub const SCRATCH_PATH: &str = "/nonexistent/kt-scratch-image/bin";

/// The `PATH` of most images (and the kubelet's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where tests/scripts/setup.sh installs what the tutorial images run.
const SETUP_HINT: &str = "tests/scripts/setup.sh installs it";

#[derive(Clone, Debug)]
pub struct Catalog {
    /// The `kt-testbed` binary (test servers, cluster DNS, the pod runner).
    pub testbed_bin: PathBuf,
    /// The `kt-node-agent` binary, when built.
    pub agent_bin: Option<PathBuf>,
    /// Where the testbed keeps what images share (busybox's applets).
    pub state_dir: PathBuf,
    /// The directory of busybox applets this machine has no program of, made once.
    applets: Arc<OnceLock<Option<PathBuf>>>,
}

/// How an image starts its program when the container gives no `command`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entrypoint {
    /// `ENTRYPOINT` in exec form (possibly empty): the arguments follow.
    Exec(Vec<String>),
    /// curlimages/curl's `entrypoint.sh`: runs the arguments, with `curl` put in front when
    /// the first is an option or no command of that name exists.
    CurlScript,
}

/// One directory of an image that a container may change: each container gets its own
/// copy, mounted at `path`.
#[derive(Clone, Debug)]
pub struct ImageDir {
    pub path: &'static str,
    /// A directory of this machine whose files the copy starts with.
    copy_of: Option<&'static str>,
    /// Files written into the copy: name → content.
    files: Vec<(&'static str, FileContent)>,
    /// Symbolic links made in the copy: name → target.
    links: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug)]
enum FileContent {
    Text(&'static str),
    /// A file of this machine.
    CopyOf(&'static str),
}

/// What a container of an image runs and gets.
#[derive(Clone, Debug)]
pub struct Image {
    entrypoint: Entrypoint,
    /// `CMD`: the arguments when the container gives none.
    cmd: Vec<String>,
    /// The `PATH` the image sets.
    pub path: String,
    /// The image's writable directories.
    pub dirs: Vec<ImageDir>,
    /// `STOPSIGNAL`: what stops the container (SIGQUIT for nginx, a graceful stop).
    pub stop_signal: libc::c_int,
}

impl Image {
    fn program(entrypoint: Vec<String>) -> Self {
        Self {
            entrypoint: Entrypoint::Exec(entrypoint),
            cmd: Vec::new(),
            path: DEFAULT_PATH.into(),
            dirs: Vec::new(),
            stop_signal: libc::SIGTERM,
        }
    }

    /// The argv a container runs: `command` replaces the entrypoint (it names a program on
    /// this machine) and `args` the image's `CMD`, as Kubernetes has it.
    pub fn argv(&self, container: &Value) -> Vec<String> {
        let list = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        };
        let (command, args) = (list(&container["command"]), list(&container["args"]));
        if !command.is_empty() {
            return [command, args].concat();
        }
        let rest = if args.is_empty() {
            self.cmd.clone()
        } else {
            args
        };
        match &self.entrypoint {
            Entrypoint::Exec(entry) => [entry.clone(), rest].concat(),
            Entrypoint::CurlScript => {
                let first = rest.first().map(String::as_str).unwrap_or("-");
                if first.starts_with('-') || !command_exists(first, &self.path) {
                    [vec!["curl".to_owned()], rest].concat()
                } else {
                    rest
                }
            }
        }
    }

    /// Makes a fresh copy of each of the image's directories under `under` and returns how
    /// to mount them.
    pub fn materialise(&self, under: &Path) -> io::Result<Vec<BindMount>> {
        let mut mounts = Vec::new();
        for (i, dir) in self.dirs.iter().enumerate() {
            let copy = under.join(format!("image-dir-{i}"));
            std::fs::create_dir_all(&copy)?;
            if let Some(source) = dir.copy_of {
                copy_tree(Path::new(source), &copy)?;
            }
            for (name, content) in &dir.files {
                let file = copy.join(name);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match content {
                    FileContent::Text(text) => std::fs::write(&file, text)?,
                    FileContent::CopyOf(source) => {
                        std::fs::copy(source, &file)?;
                    }
                }
            }
            for (name, target) in &dir.links {
                symlink(target, copy.join(name))?;
            }
            mounts.push(BindMount {
                source: copy,
                target: dir.path.into(),
                read_only: false,
            });
        }
        Ok(mounts)
    }
}

/// Whether `name` runs as a command with `path` (`command -v` of a program).
fn command_exists(name: &str, path: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    path.split(':')
        .any(|dir| !dir.is_empty() && Path::new(dir).join(name).is_file())
}

/// Copies the files and directories under `from` into `to` (which exists).
fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `registry:5000/a/b:tag@sha256:…` → `a/b` (registry host dropped when it has a dot or a
/// port, as Docker parses names; Docker Hub's `library/` dropped).
pub fn repository(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let (name, _tag) = match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], &image[i + 1..]),
        _ => (image, ""),
    };
    let name = match name.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => name,
    };
    name.strip_prefix("library/").unwrap_or(name).to_owned()
}

/// The official nginx image's `/etc/nginx/nginx.conf`, with Debian's paths for what nginx
/// writes (its temporary files and pid under `/var/lib/nginx`, each container's own) and
/// Debian's `www-data` for the workers.
const NGINX_CONF: &str = r#"user  www-data;
worker_processes  auto;

error_log  /var/log/nginx/error.log notice;
pid        /var/lib/nginx/nginx.pid;

events {
    worker_connections  1024;
}

http {
    include       /etc/nginx/mime.types;
    default_type  application/octet-stream;

    log_format  main  '$remote_addr - $remote_user [$time_local] "$request" '
                      '$status $body_bytes_sent "$http_referer" '
                      '"$http_user_agent" "$http_x_forwarded_for"';

    access_log  /var/log/nginx/access.log  main;

    sendfile        on;
    keepalive_timeout  65;

    include /etc/nginx/conf.d/*.conf;
}
"#;

/// The official nginx image's `/etc/nginx/conf.d/default.conf` (IPv4: the testbed's pods
/// have no IPv6 address).
const NGINX_DEFAULT_CONF: &str = r#"server {
    listen       80;
    server_name  localhost;

    location / {
        root   /usr/share/nginx/html;
        index  index.html index.htm;
    }

    error_page   500 502 503 504  /50x.html;
    location = /50x.html {
        root   /usr/share/nginx/html;
    }
}
"#;

/// The official nginx image's `/usr/share/nginx/html/50x.html`.
const NGINX_50X: &str = r#"<!DOCTYPE html>
<html>
<head>
<title>Error</title>
<style>
html { color-scheme: light dark; }
body { width: 35em; margin: 0 auto;
font-family: Tahoma, Verdana, Arial, sans-serif; }
</style>
</head>
<body>
<h1>An error occurred.</h1>
<p>Sorry, the page you are looking for is currently unavailable.<br/>
Please try again later.</p>
<p>If you are the system administrator of this resource then you should check
the error log for details.</p>
<p><em>Faithfully yours, nginx.</em></p>
</body>
</html>
"#;

/// nginx as the official image runs it: `nginx -g 'daemon off;'` with the image's
/// configuration, its default page in a writable `/usr/share/nginx/html`, the access log to
/// stdout and the error log to stderr (the pod's log), stopped gracefully by SIGQUIT.
fn nginx() -> Image {
    Image {
        cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
        dirs: vec![
            ImageDir {
                path: "/etc/nginx",
                copy_of: None,
                files: vec![
                    ("nginx.conf", FileContent::Text(NGINX_CONF)),
                    ("conf.d/default.conf", FileContent::Text(NGINX_DEFAULT_CONF)),
                    ("mime.types", FileContent::CopyOf("/etc/nginx/mime.types")),
                ],
                links: Vec::new(),
            },
            ImageDir {
                path: "/usr/share/nginx/html",
                copy_of: Some("/usr/share/nginx/html"),
                files: vec![("50x.html", FileContent::Text(NGINX_50X))],
                links: Vec::new(),
            },
            ImageDir {
                path: "/var/log/nginx",
                copy_of: None,
                files: Vec::new(),
                links: vec![
                    ("access.log", "/dev/stdout".into()),
                    ("error.log", "/dev/stderr".into()),
                ],
            },
            ImageDir {
                path: "/var/lib/nginx",
                copy_of: None,
                files: Vec::new(),
                links: Vec::new(),
            },
        ],
        stop_signal: libc::SIGQUIT,
        ..Image::program(Vec::new())
    }
}

impl Catalog {
    pub fn new(testbed_bin: PathBuf, agent_bin: Option<PathBuf>, state_dir: PathBuf) -> Self {
        Self {
            testbed_bin,
            agent_bin,
            state_dir,
            applets: Arc::default(),
        }
    }

    /// The image named `image`: `Ok(None)` if the testbed does not know it, `Err` with the
    /// reason if this machine lacks what it runs.
    pub fn image(&self, image: &str) -> Result<Option<Image>, String> {
        let repo = repository(image);
        let testbed = |name: &str| {
            Image::program(vec![
                self.testbed_bin.display().to_string(),
                "image".into(),
                name.into(),
            ])
        };
        let needs = |program: &str, package: &str| {
            if command_exists(program, DEFAULT_PATH) {
                Ok(())
            } else {
                Err(format!(
                    "{program} is not installed on this machine (Debian package {package}; {SETUP_HINT})"
                ))
            }
        };
        let image = match repo.as_str() {
            "kt-testbed/http-echo" => testbed("http-echo"),
            "kt-testbed/tcp-echo" => testbed("tcp-echo"),
            "kt-testbed/udp-echo" => testbed("udp-echo"),
            "kt-testbed/dns" => testbed("dns"),
            "kt-testbed/sleep" | "pause" => testbed("sleep"),
            "nginx" => {
                needs("nginx", "nginx-light")?;
                nginx()
            }
            "busybox" | "alpine" => Image {
                cmd: vec!["sh".into()],
                path: match self.applets() {
                    Some(dir) => format!("{DEFAULT_PATH}:{}", dir.display()),
                    None => DEFAULT_PATH.into(),
                },
                ..Image::program(Vec::new())
            },
            "curlimages/curl" => {
                needs("curl", "curl")?;
                Image {
                    entrypoint: Entrypoint::CurlScript,
                    cmd: vec!["curl".into()],
                    ..Image::program(Vec::new())
                }
            }
            // The ktctl v0.3.7 shadow image: OpenSSH under the shadow contract, with the
            // image's DNS relay (the agent binary's `dns-relay`) when the agent is built.
            r if r.ends_with("kt-connect-shadow") => {
                let mut argv = vec![
                    self.testbed_bin.display().to_string(),
                    "image".into(),
                    "openssh-shadow".into(),
                ];
                if let Some(agent) = &self.agent_bin {
                    argv.extend(["--dns-relay".into(), agent.display().to_string()]);
                }
                // `/root` and `/run` are the image's own, empty and writable (the program
                // runs with the container's capabilities, so it cannot mount them itself).
                let empty = |path| ImageDir {
                    path,
                    copy_of: None,
                    files: Vec::new(),
                    links: Vec::new(),
                };
                Image {
                    dirs: vec![empty("/root"), empty("/run")],
                    ..Image::program(argv)
                }
            }
            // kt's own shadow: the agent binary in role `shadow`.
            r if r.ends_with("kt-shadow") => match &self.agent_bin {
                Some(p) => Image::program(vec![p.display().to_string(), "shadow".into()]),
                None => return Ok(None),
            },
            // The mesh router pod of ktctl v0.3.7's auto mode (its image and kt's): the agent
            // binary in role `router`, with v0.3.7's `/usr/sbin/router` command and a
            // writable state directory.
            r if r.ends_with("kt-connect-router") || r.ends_with("kt-router") => {
                match &self.agent_bin {
                    Some(p) => Image {
                        dirs: vec![
                            ImageDir {
                                path: "/var/kt-router",
                                copy_of: None,
                                files: Vec::new(),
                                links: Vec::new(),
                            },
                            ImageDir {
                                path: "/usr/sbin",
                                copy_of: None,
                                files: Vec::new(),
                                links: vec![("router", p.display().to_string())],
                            },
                        ],
                        ..Image::program(vec![p.display().to_string(), "router".into()])
                    },
                    None => return Ok(None),
                }
            }
            // The ephemeral container of `exchange --mode ephemeral` (v0.3.7's navigator image
            // and kt's): the agent binary in role `navigator` (it runs `nft`, as the image has).
            r if r.ends_with("kt-connect-navigator") || r.ends_with("kt-navigator") => {
                match &self.agent_bin {
                    Some(p) => Image::program(vec![p.display().to_string(), "navigator".into()]),
                    None => return Ok(None),
                }
            }
            // kt's agent image is `FROM scratch` (deploy/images/agent.Containerfile): the
            // binary and nothing else, so its `PATH` finds no program, as in the image.
            r if r.ends_with("kt-node-agent") => match &self.agent_bin {
                Some(p) => Image {
                    path: SCRATCH_PATH.into(),
                    ..Image::program(vec![p.display().to_string()])
                },
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        Ok(Some(image))
    }

    /// A directory of links to busybox for each applet this machine has no program of
    /// (`nslookup`, `nc`, …), made on first use; `None` without busybox.
    fn applets(&self) -> Option<PathBuf> {
        self.applets
            .get_or_init(|| {
                let busybox = Path::new("/bin/busybox");
                let list = std::process::Command::new(busybox)
                    .arg("--list")
                    .output()
                    .ok()
                    .filter(|o| o.status.success())?;
                let dir = self.state_dir.join("images").join("busybox-applets");
                std::fs::create_dir_all(&dir).ok()?;
                for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
                    if !command_exists(applet, DEFAULT_PATH) {
                        let _ = symlink(busybox, dir.join(applet));
                    }
                }
                Some(dir)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn catalog() -> Catalog {
        Catalog::new("/bin/kt-testbed".into(), None, std::env::temp_dir())
    }

    fn argv(c: &Catalog, container: Value) -> Vec<String> {
        c.image(container["image"].as_str().unwrap())
            .unwrap()
            .unwrap()
            .argv(&container)
    }

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
        assert_eq!(repository("docker.io/library/nginx:alpine"), "nginx");
        assert_eq!(repository("nginx:1.27-alpine"), "nginx");
    }

    #[test]
    fn command_replaces_the_entrypoint_and_args_the_cmd() {
        let c = catalog();
        assert_eq!(
            argv(
                &c,
                json!({"image": "kt-testbed/http-echo", "args": ["--x"]})
            ),
            ["/bin/kt-testbed", "image", "http-echo", "--x"]
        );
        assert_eq!(
            argv(
                &c,
                json!({"image": "busybox", "command": ["tail", "-f", "/dev/null"]})
            ),
            ["tail", "-f", "/dev/null"]
        );
        assert_eq!(argv(&c, json!({"image": "busybox:1.36"})), ["sh"]);
        assert_eq!(
            argv(&c, json!({"image": "alpine", "args": ["sleep", "5"]})),
            ["sleep", "5"]
        );
        assert!(c.image("nosuch/image:1.21").unwrap().is_none());
        assert_eq!(
            argv(
                &c,
                json!({"image": "registry.cn-hangzhou.aliyuncs.com/rdc-incubator/kt-connect-shadow:v0.3.7"})
            ),
            ["/bin/kt-testbed", "image", "openssh-shadow"]
        );
        assert!(
            c.image("kt-node-agent:dev").unwrap().is_none(),
            "no agent binary configured"
        );
    }

    #[test]
    fn curl_goes_in_front_of_options_and_of_what_is_no_command() {
        let image = Image {
            entrypoint: Entrypoint::CurlScript,
            cmd: vec!["curl".into()],
            ..Image::program(Vec::new())
        };
        let run = |args: Value| image.argv(&json!({"image": "curlimages/curl", "args": args}));
        assert_eq!(run(json!(null)), ["curl"]);
        assert_eq!(
            run(json!(["-s", "http://web"])),
            ["curl", "-s", "http://web"]
        );
        assert_eq!(run(json!(["http://web"])), ["curl", "http://web"]);
        assert_eq!(run(json!(["sh", "-c", "true"])), ["sh", "-c", "true"]);
    }

    #[test]
    fn nginx_runs_in_the_foreground_and_stops_gracefully() {
        let image = nginx();
        assert_eq!(
            image.argv(&json!({"image": "nginx:alpine"})),
            ["nginx", "-g", "daemon off;"]
        );
        assert_eq!(image.stop_signal, libc::SIGQUIT);
        let paths: Vec<&str> = image.dirs.iter().map(|d| d.path).collect();
        assert!(paths.contains(&"/usr/share/nginx/html"), "{paths:?}");
    }

    #[test]
    fn materialised_dirs_are_fresh_copies_with_files_and_links() {
        let under = std::env::temp_dir().join(crate::sys::unique_name("image-dirs"));
        let source = under.join("source");
        std::fs::create_dir_all(source.join("sub")).unwrap();
        std::fs::write(source.join("sub/page.html"), "hello").unwrap();
        let source: &'static str = Box::leak(source.display().to_string().into_boxed_str());
        let image = Image {
            dirs: vec![ImageDir {
                path: "/srv/www",
                copy_of: Some(source),
                files: vec![("conf/x.conf", FileContent::Text("x"))],
                links: vec![("out.log", "/dev/stdout".into())],
            }],
            ..Image::program(Vec::new())
        };
        let mounts = image.materialise(&under.join("c1")).unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].target, Path::new("/srv/www"));
        let copy = &mounts[0].source;
        assert_eq!(
            std::fs::read_to_string(copy.join("sub/page.html")).unwrap(),
            "hello"
        );
        assert_eq!(
            std::fs::read_to_string(copy.join("conf/x.conf")).unwrap(),
            "x"
        );
        assert_eq!(
            std::fs::read_link(copy.join("out.log")).unwrap(),
            Path::new("/dev/stdout")
        );
        // Each container writes its own copy.
        std::fs::write(copy.join("sub/page.html"), "changed").unwrap();
        let other = image.materialise(&under.join("c2")).unwrap();
        assert_eq!(
            std::fs::read_to_string(other[0].source.join("sub/page.html")).unwrap(),
            "hello"
        );
        std::fs::remove_dir_all(&under).unwrap();
    }
}

//! Black-box tests of the ktctl binary: output, exit codes and message texts that users and
//! scripts of v0.3.7 rely on.

use std::process::{Command, Output};

fn ktctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ktctl"))
        .args(args)
        .env_remove("KT_LOG")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_prints_ktctl_version() {
    for flag in ["-v", "--version"] {
        let out = ktctl(&[flag]);
        assert!(out.status.success());
        let printed = text(&out.stdout);
        // v0.3.7's `ktctl version <version>` first, then the commit and target of this build.
        let rest = printed
            .strip_prefix(&format!(
                "ktctl version {} (commit ",
                env!("CARGO_PKG_VERSION")
            ))
            .unwrap_or_else(|| panic!("{printed:?}"));
        let (commit, target) = rest
            .strip_suffix(")\n")
            .and_then(|r| r.split_once(", "))
            .unwrap_or_else(|| panic!("{printed:?}"));
        let git_head = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| text(&o.stdout).trim().to_owned());
        if let Some(head) = git_head {
            assert_eq!(commit, head, "{printed:?}");
        }
        assert!(
            target.starts_with(std::env::consts::ARCH) && target.contains(std::env::consts::OS),
            "{printed:?}"
        );
    }
}

#[test]
fn bare_ktctl_prints_help() {
    let out = ktctl(&[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(help.contains("A utility tool to help you work with Kubernetes dev environment"));
    for flag in [
        "--namespace",
        "--kubeconfig",
        "--podCreationTimeout",
        "--useShadowDeployment",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
    assert!(!help.contains("--asWorker"), "hidden flag shown:\n{help}");
}

#[test]
fn bad_input_is_err_exit_with_code_1() {
    for (args, names) in [
        (&["--nosuchflag"][..], "--nosuchflag"),
        (&["--podCreationTimeout", "soon"][..], "soon"),
        (&["--debug=maybe"][..], "maybe"),
    ] {
        let out = ktctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        let line = err.lines().next().unwrap_or_default();
        // `3:04PM ERR Exit: ...`
        let mut parts = line.splitn(3, ' ');
        let time = parts.next().unwrap();
        assert!(time.ends_with("AM") || time.ends_with("PM"), "{line}");
        assert_eq!(parts.next(), Some("ERR"), "{line}");
        let message = parts.next().unwrap();
        assert!(
            message.starts_with("Exit: ") && message.contains(names),
            "{line}"
        );
    }
}

#[test]
fn global_flags_accept_false() {
    let out = ktctl(&["--debug=false", "-v"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn completion_scripts_generate_for_four_shells_and_bash_parses_its_own() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ktctl"),
        ("fish", "complete -c ktctl"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = ktctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for needle in [marker, "exchange", "expose", "dnsMode"] {
            assert!(script.contains(needle), "{shell} lacks {needle}");
        }
        if shell == "bash" {
            let dir = std::env::temp_dir().join(format!("ktt-completion-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("ktctl.bash");
            std::fs::write(&file, &script).unwrap();
            let checked = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            assert!(checked.status.success(), "{}", text(&checked.stderr));
        }
    }
    let out = ktctl(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("tcsh"), "{}", text(&out.stderr));
}

#[test]
fn every_commands_help_has_an_example() {
    for command in [
        "connect",
        "forward",
        "exchange",
        "mesh",
        "preview",
        "recover",
        "clean",
        "config",
        "birdseye",
        "completion",
    ] {
        let out = ktctl(&[command, "--help"]);
        assert!(out.status.success(), "{command}");
        let help = text(&out.stdout);
        let example = help
            .lines()
            .skip_while(|l| !l.starts_with("Example"))
            .nth(1)
            .unwrap_or_default();
        assert!(
            example
                .trim_start()
                .starts_with(&format!("ktctl {command}"))
                || example
                    .trim_start()
                    .starts_with(&format!("sudo ktctl {command}"))
                || (command == "completion" && help.contains("ktctl completion bash")),
            "{command} --help has no example:\n{help}"
        );
    }
}

#[test]
fn completion_into_a_closed_pipe_exits_quietly() {
    use std::io::Read as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ktctl"))
        .args(["completion", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -0`: the reader goes away before reading anything.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(status.code(), Some(0), "{err}");
}

#[test]
fn recover_refuses_what_is_not_a_service_name_before_any_cluster_call() {
    for argument in ["deploy/echo", "pod/x", "../pods", "svc/", "Web"] {
        // No kubeconfig at all: the argument is refused first.
        let out = Command::new(env!("CARGO_BIN_EXE_ktctl"))
            .args(["recover", argument, "-c", "/nonexistent/kubeconfig"])
            .env_remove("KT_LOG")
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{argument}: {err}");
        assert!(
            err.contains(&format!("invalid service '{argument}'")),
            "{argument}: {err}"
        );
    }
}

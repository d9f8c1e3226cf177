//! Black-box tests of `ktctl config` and of config values as flag defaults (flag > config >
//! built-in), each with `HOME` set to a fresh directory and no sudo variables. None needs a
//! cluster: a configured kubeconfig that does not exist shows which one a command used.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

/// A fresh `HOME`, removed when dropped.
struct Home(PathBuf);

impl Home {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kt-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn ktctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ktctl"))
            .args(args)
            .env("HOME", &self.0)
            .env_remove("SUDO_USER")
            .env_remove("SUDO_UID")
            .env_remove("SUDO_GID")
            .env_remove("KT_LOG")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs ktctl, expecting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ktctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {:?}\n{}",
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Runs ktctl, expecting exit code 1 and an `ERR Exit:` line; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.ktctl(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "", "{args:?}");
        let err = text(&out.stderr);
        err.lines()
            .find(|l| l.contains(" ERR Exit: "))
            .unwrap_or_else(|| panic!("{args:?}: no ERR Exit line in {err}"))
            .to_owned()
    }

    fn config(&self) -> PathBuf {
        self.0.join(".kt/config")
    }

    fn read_config(&self) -> Option<String> {
        std::fs::read_to_string(self.config()).ok()
    }

    fn write_config(&self, text: &str) {
        std::fs::create_dir_all(self.0.join(".kt")).unwrap();
        std::fs::write(self.config(), text).unwrap();
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn set_get_show_profiles_unset_and_load_round_trip() {
    let home = Home::new("round-trip");
    assert_eq!(home.ok(&["config", "show"]), "", "no config file yet");
    // The three forms of `set`.
    assert_eq!(
        home.ok(&["config", "set", "connect.dns-mode", "hosts:default,dev"]),
        ""
    );
    home.ok(&["config", "set", "exchange.mode=scale"]);
    home.ok(&["config", "set", "global.with-label", "=", "team=a"]);
    home.ok(&["config", "set", "global.image=my.registry/shadow:v1"]);
    assert_eq!(mode(&home.config()), 0o644);
    assert_eq!(
        home.ok(&[
            "config",
            "get",
            "exchange.mode",
            "global.with-label",
            "mesh.mode"
        ]),
        "exchange.mode = scale\nglobal.with-label = team=a\nmesh.mode = <empty>\n"
    );
    let shown = "connect.dns-mode = hosts:default,dev\nexchange.mode = scale\n\
                 global.image = my.registry/shadow:v1\nglobal.with-label = team=a\n";
    assert_eq!(home.ok(&["config", "show"]), shown);
    let all = home.ok(&["config", "show", "--all"]);
    assert!(all.contains("\nexchange.recover-wait-time\n"), "{all}");
    assert!(all.contains("\nexchange.mode = scale\n"), "{all}");

    home.ok(&["config", "save-profile", "p1"]);
    let list = home.ok(&["config", "list-profile"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert_eq!(lines[0], "Save Date          \t\tName");
    let (date, name) = lines[1].split_once("\t\t").unwrap();
    assert_eq!(name, "p1");
    // YYYY-MM-DD HH:MM:SS
    assert_eq!(date.len(), 19, "{date}");
    for (i, c) in date.char_indices() {
        match i {
            4 | 7 => assert_eq!(c, '-', "{date}"),
            10 => assert_eq!(c, ' ', "{date}"),
            13 | 16 => assert_eq!(c, ':', "{date}"),
            _ => assert!(c.is_ascii_digit(), "{date}"),
        }
    }
    let profile = std::fs::read_to_string(home.0.join(".kt/profile/p1")).unwrap();
    assert_eq!(Some(profile.clone()), home.read_config());

    home.ok(&["config", "unset", "global.image", "global.with-label"]);
    assert_eq!(
        home.ok(&["config", "show"]),
        "connect.dns-mode = hosts:default,dev\nexchange.mode = scale\n"
    );
    home.ok(&["config", "unset", "--all"]);
    assert_eq!(home.read_config().as_deref(), Some("{}\n"));
    assert_eq!(home.ok(&["config", "show"]), "");

    assert_eq!(
        home.ok(&["config", "load-profile", "p1", "--dryRun"]),
        profile
    );
    assert_eq!(
        home.read_config().as_deref(),
        Some("{}\n"),
        "dry run changed the config"
    );
    home.ok(&["config", "load-profile", "p1"]);
    assert_eq!(home.ok(&["config", "show"]), shown);

    home.ok(&["config", "drop-profile", "p1"]);
    assert_eq!(
        home.ok(&["config", "list-profile"]),
        "Save Date          \t\tName\n"
    );
    let line = home.fails(&["config", "drop-profile", "p1"]);
    assert!(line.contains("profile 'p1' not found"), "{line}");
}

#[test]
fn bad_items_values_and_profile_names_are_refused_and_change_nothing() {
    let home = Home::new("refused");
    home.ok(&["config", "set", "exchange.mode", "selector"]);
    let before = home.read_config();
    for (args, message) in [
        (
            &["config", "set", "exchange.mode", "bogus"][..],
            "invalid value 'bogus' for config item exchange.mode: possible values: auto, agent, \
             selector, scale, ephemeral",
        ),
        (
            &["config", "set", "global.debug=maybe"],
            "invalid value 'maybe' for config item global.debug",
        ),
        (
            &["config", "set", "global.pod-creation-timeout", "soon"],
            "invalid value 'soon' for config item global.pod-creation-timeout",
        ),
        (
            &["config", "set", "connect.dnsMode", "hosts"],
            "invalid config item 'connect.dnsMode': items are dash-separated, try \
             'connect.dns-mode'",
        ),
        (
            &["config", "set", "connect.dns-port", "53"],
            "config item 'connect.dns-port' is not supported by kt: ",
        ),
        (
            &["config", "set", "global.ip-version", "6"],
            "config item 'global.ip-version' is not supported by kt: ",
        ),
        (
            &["config", "set", "exchange.nope", "1"],
            "unknown config item 'exchange.nope'",
        ),
        (
            &["config", "set", "exchange.mode"],
            "no value given for 'exchange.mode'",
        ),
        (
            &["config", "get", "global.bogus"],
            "unknown config item 'global.bogus'",
        ),
        (
            &["config", "unset", "exchange.mode", "global.bogus"],
            "unknown config item 'global.bogus'",
        ),
        (&["config", "unset"], "no item given"),
        (
            &["config", "unset", "--all", "exchange.mode"],
            "`--all` unsets every item: give it no item names (got 'exchange.mode')",
        ),
        (
            &["config", "save-profile", "../evil"],
            "invalid profile name '../evil'",
        ),
        (
            &["config", "load-profile", ".hidden"],
            "invalid profile name '.hidden'",
        ),
        (
            &["config", "load-profile", "none"],
            "profile 'none' not found",
        ),
    ] {
        let line = home.fails(args);
        assert!(
            line.contains(&format!("ERR Exit: {message}")),
            "{args:?}: {line}"
        );
        assert_eq!(home.read_config(), before, "{args:?} changed the config");
    }
    assert!(!home.0.join("evil").exists() && !home.0.join(".kt/evil").exists());
}

#[test]
fn save_profile_overwrites_only_with_force_when_stdin_is_no_terminal() {
    let home = Home::new("overwrite");
    home.ok(&["config", "set", "global.namespace", "one"]);
    home.ok(&["config", "save-profile", "p"]);
    home.ok(&["config", "set", "global.namespace", "two"]);
    let line = home.fails(&["config", "save-profile", "p"]);
    assert!(
        line.contains("profile 'p' already exists and stdin is not a terminal")
            && line.contains("--force"),
        "{line}"
    );
    let profile = || std::fs::read_to_string(home.0.join(".kt/profile/p")).unwrap();
    assert!(profile().contains("one"), "{}", profile());
    home.ok(&["config", "save-profile", "p", "--force"]);
    assert!(profile().contains("two"), "{}", profile());
    assert_eq!(mode(&home.0.join(".kt/profile/p")), 0o644);
}

#[test]
fn a_configured_kubeconfig_is_used_and_a_flag_overrides_it() {
    let home = Home::new("kubeconfig");
    home.ok(&["config", "set", "global.kubeconfig", "/nonexistent/kc"]);
    let line = home.fails(&["forward", "svc", "8080"]);
    assert!(
        line.contains("ERR Exit: failed to read kubeconfig /nonexistent/kc: "),
        "{line}"
    );
    let line = home.fails(&["forward", "svc", "8080", "-c", "/other/kc"]);
    assert!(
        line.contains("ERR Exit: failed to read kubeconfig /other/kc: "),
        "{line}"
    );
}

#[test]
fn a_bad_config_stops_commands_but_not_config() {
    let home = Home::new("bad-value");
    home.write_config("exchange:\n  mode: bogus\n");
    let line = home.fails(&["exchange", "x", "--expose", "1"]);
    let config = home.config();
    assert!(
        line.contains(&format!(
            "ERR Exit: invalid value 'bogus' for config item exchange.mode in {}: possible \
             values: auto, agent, selector, scale, ephemeral",
            config.display()
        )),
        "{line}"
    );
    // Even a command that does not use the item: the file must be fixed first.
    let line = home.fails(&["forward", "svc", "8080", "-c", "/other/kc"]);
    assert!(line.contains("exchange.mode"), "{line}");
    assert_eq!(home.ok(&["config", "show"]), "exchange.mode = bogus\n");
    home.ok(&["config", "unset", "exchange.mode"]);
    let line = home.fails(&["forward", "svc", "8080", "-c", "/other/kc"]);
    assert!(
        line.contains("failed to read kubeconfig /other/kc"),
        "{line}"
    );

    home.write_config("connect: {mode: tun2socks\n");
    let line = home.fails(&["forward", "svc", "8080", "-c", "/other/kc"]);
    assert!(
        line.contains(&format!("ERR Exit: {} is not valid YAML", config.display())),
        "{line}"
    );
    home.ok(&["config", "unset", "--all"]);
    assert_eq!(home.read_config().as_deref(), Some("{}\n"));
}

#[test]
fn a_v0_3_7_item_kt_lacks_is_ignored_with_a_warning() {
    let home = Home::new("ignored");
    home.write_config("connect:\n  dns-port: 10053\n");
    let out = home.ktctl(&["forward", "svc", "8080", "-c", "/other/kc"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("WRN Ignoring ") && err.contains("'connect.dns-port' is not supported"),
        "{err}"
    );
    assert!(err.contains("failed to read kubeconfig /other/kc"), "{err}");
    assert_eq!(home.ok(&["config", "show"]), "connect.dns-port = 10053\n");
}

#[test]
fn help_shows_configured_defaults_and_a_configured_expose_is_no_longer_required() {
    let home = Home::new("help");
    let line = home.fails(&["exchange", "x"]);
    assert!(
        line.ends_with("required flag(s) \"expose\" not set"),
        "{line}"
    );
    home.ok(&["config", "set", "exchange.expose", "8080"]);
    home.ok(&["config", "set", "exchange.mode", "scale"]);
    let help = home.ok(&["exchange", "--help"]);
    assert!(help.contains("[default: 8080]"), "{help}");
    assert!(help.contains("[default: scale]"), "{help}");
    // It gets past parsing, to the (missing) kubeconfig.
    let line = home.fails(&["exchange", "x", "-c", "/nonexistent/kc"]);
    assert!(
        line.contains("failed to read kubeconfig /nonexistent/kc"),
        "{line}"
    );
}

#[test]
fn config_help_hides_the_global_flags_which_still_parse() {
    let home = Home::new("config-help");
    let help = home.ok(&["config", "--help"]);
    assert!(
        help.starts_with("List, get or set default value for command options"),
        "{help}"
    );
    for sub in [
        "show",
        "get",
        "set",
        "unset",
        "list-profile",
        "save-profile",
        "load-profile",
        "drop-profile",
    ] {
        assert!(help.contains(&format!("  {sub} ")), "{sub}: {help}");
    }
    assert!(
        !help.contains("--namespace") && !help.contains("--kubeconfig"),
        "{help}"
    );
    assert_eq!(home.ok(&["config"]), help);
    let show_help = home.ok(&["config", "show", "--help"]);
    assert!(
        show_help.contains("--all") && !show_help.contains("--debug"),
        "{show_help}"
    );
    home.ok(&["config", "show", "-d", "-n", "dev"]);
}

#[test]
fn clean_local_only_says_so_when_nothing_is_left() {
    let home = Home::new("clean-local");
    let out = home.ktctl(&["clean", "--localOnly"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Without root the DNS part is skipped, saying so; with root nothing is left to do.
    let expected = if unsafe { libc::geteuid() } == 0 {
        "No unavailing local kt file found"
    } else {
        "Not root user, DNS cleanup skipped"
    };
    assert!(err.contains(expected), "{err}");
}

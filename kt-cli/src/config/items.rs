//! The config items: one per long flag, named `<group>.<dash-separated flag>` as in ktctl
//! v0.3.7 (`config/common.go`, `util.DashSeparated`): `global.pod-creation-timeout`,
//! `exchange.recover-wait-time`, `connect.via`. The table is derived from the clap command
//! tree (the root's global flags are group `global`, each subcommand's own flags its group),
//! so a new command or flag gets its item without anyone listing it, and a value is checked
//! with the flag's own value parser.

use std::path::Path;

use clap::builder::ValueParser;

use super::{ConfigError, Groups};

/// A config item name or value that kt refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ItemError {
    #[error("invalid config item '{0}', should be <group>.<item>, e.g. connect.dns-mode")]
    Shape(String),
    /// v0.3.7 looks items up dash-separated only; kt says which name was meant.
    #[error("invalid config item '{given}': items are dash-separated, try '{suggestion}'")]
    CamelCase { given: String, suggestion: String },
    /// A v0.3.7 item for which kt has no flag.
    #[error("config item '{key}' is not supported by kt: {why}")]
    Unsupported { key: String, why: &'static str },
    #[error("unknown config item '{0}' (`ktctl config show --all` lists them)")]
    Unknown(String),
    #[error("invalid value '{value}' for config item {key}: {reason}")]
    Value {
        key: String,
        value: String,
        reason: String,
    },
}

/// v0.3.7 items that kt has no flag for, and why (ktctl v0.3.7 `options/*.go`).
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "connect.dns-port",
        "v0.3.7's --dnsPort exists on macOS only, and kt runs on Linux",
    ),
    (
        "connect.include-domains",
        "v0.3.7's --includeDomains exists on macOS only, and kt runs on Linux",
    ),
    (
        "connect.global",
        "a v0.3.7 option without a flag that no command reads",
    ),
    (
        "global.listen-check",
        "a v0.3.7 option without a flag that no command reads",
    ),
    (
        "global.ip-version",
        "--ipVersion came after v0.3.7 and kt has no IPv6 mode",
    ),
    (
        "global.as-worker",
        "--asWorker is hidden and does nothing (nor did it in v0.3.7)",
    ),
];

/// One item: a long flag of the root (group `global`) or of a subcommand.
#[derive(Clone, Debug)]
pub struct Item {
    /// `global`, or the subcommand's name.
    pub group: String,
    /// The dash-separated long flag: `recover-wait-time`.
    pub name: String,
    /// The long flag as typed: `recoverWaitTime`.
    pub flag: String,
    /// The clap argument id (what `mut_arg` takes).
    id: String,
    parser: ValueParser,
    /// Whether the flag has a built-in default (an empty config value for a flag without one
    /// leaves it unset: `global.namespace: ""` still follows the kubeconfig context).
    has_default: bool,
}

impl Item {
    /// `<group>.<name>`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.group, self.name)
    }

    /// Checks `value` with the flag's own value parser; the error names the item, the value
    /// and what the flag accepts.
    pub fn check(&self, value: &str) -> Result<(), ItemError> {
        let probe = clap::Command::new("config")
            .no_binary_name(true)
            .disable_help_flag(true)
            .color(clap::ColorChoice::Never)
            .arg(
                clap::Arg::new("value")
                    .value_parser(self.parser.clone())
                    .allow_hyphen_values(true)
                    .required(true),
            );
        probe
            .try_get_matches_from([value])
            .map(drop)
            .map_err(|error| ItemError::Value {
                key: self.key(),
                value: value.to_owned(),
                reason: reason(&error),
            })
    }
}

/// Why clap refused a value: the allowed values, or the parser's own message.
fn reason(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    if let Some(ContextValue::Strings(valid)) = error.get(ContextKind::ValidValue) {
        return format!("possible values: {}", valid.join(", "));
    }
    if let Some(source) = std::error::Error::source(error) {
        return source.to_string();
    }
    let text = error.render().to_string();
    text.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

/// All items, in the command tree's order (subcommands in order, then `global`).
#[derive(Clone, Debug)]
pub struct Items {
    items: Vec<Item>,
}

/// Config values that become flag defaults, and the entries that are ignored (with why).
#[derive(Debug)]
pub struct Defaults<'a> {
    pub values: Vec<(&'a Item, String)>,
    pub ignored: Vec<String>,
}

impl Items {
    /// The items of `command` (kt's: `args::Cli::command()`): the root's visible global long
    /// flags as `global.*`, and each visible subcommand's own visible long flags as
    /// `<subcommand>.*`. Positional arguments, help and hidden flags are no items.
    pub fn from_command(command: &clap::Command) -> Self {
        let item = |group: &str, arg: &clap::Arg| {
            let flag = arg.get_long()?;
            let is_help = matches!(
                arg.get_action(),
                clap::ArgAction::Help | clap::ArgAction::Version
            );
            (!arg.is_hide_set() && !is_help).then(|| Item {
                group: group.to_owned(),
                name: dash_separated(flag),
                flag: flag.to_owned(),
                id: arg.get_id().to_string(),
                parser: arg.get_value_parser().clone(),
                has_default: !arg.get_default_values().is_empty(),
            })
        };
        let commands = command
            .get_subcommands()
            .filter(|sub| !sub.is_hide_set())
            .flat_map(|sub| {
                sub.get_arguments()
                    .filter(|arg| !arg.is_global_set())
                    .filter_map(|arg| item(sub.get_name(), arg))
            });
        let globals = command
            .get_arguments()
            .filter(|arg| arg.is_global_set())
            .filter_map(|arg| item("global", arg));
        Self {
            items: commands.chain(globals).collect(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Item> {
        self.items.iter()
    }

    /// The item named `key`, or why there is none: not `<group>.<item>`, camelCase (with the
    /// dash form), a v0.3.7 item kt has no flag for (with why), or unknown.
    pub fn lookup(&self, key: &str) -> Result<&Item, ItemError> {
        let Some((group, name)) = key.split_once('.').filter(|(g, n)| {
            !g.is_empty() && !n.is_empty() && !n.contains('.') && !key.contains(char::is_whitespace)
        }) else {
            return Err(ItemError::Shape(key.to_owned()));
        };
        if let Some(item) = self.find(group, name) {
            return Ok(item);
        }
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == key) {
            return Err(ItemError::Unsupported {
                key: key.to_owned(),
                why,
            });
        }
        let suggestion = format!(
            "{}.{}",
            group.to_ascii_lowercase(),
            dash_separated(name).trim_start_matches('-')
        );
        let known = |k: &str| self.iter().any(|i| i.key() == k) || Self::unsupported(k);
        if suggestion != key && known(&suggestion) {
            return Err(ItemError::CamelCase {
                given: key.to_owned(),
                suggestion,
            });
        }
        Err(ItemError::Unknown(key.to_owned()))
    }

    /// Whether `key` is a v0.3.7 item kt has no flag for.
    pub fn unsupported(key: &str) -> bool {
        UNSUPPORTED.iter().any(|(k, _)| *k == key)
    }

    fn find(&self, group: &str, name: &str) -> Option<&Item> {
        self.iter().find(|i| i.group == group && i.name == name)
    }

    /// The item named `key` if `value` is valid for it.
    pub fn check(&self, key: &str, value: &str) -> Result<&Item, ItemError> {
        let item = self.lookup(key)?;
        item.check(value)?;
        Ok(item)
    }

    /// What a config file (read from `path`) sets: a value its flag refuses is an error
    /// naming the item, the value and the file; an entry that is no item of kt's is ignored
    /// with a warning (a v0.3.7 config may hold `connect.dns-port`).
    pub fn defaults<'a>(
        &'a self,
        groups: &Groups,
        path: &Path,
    ) -> Result<Defaults<'a>, ConfigError> {
        let mut defaults = Defaults {
            values: Vec::new(),
            ignored: Vec::new(),
        };
        for (group, entries) in groups {
            for (name, value) in entries {
                let key = format!("{group}.{name}");
                let item = match self.lookup(&key) {
                    Ok(item) => item,
                    Err(why) => {
                        defaults
                            .ignored
                            .push(format!("Ignoring {}: {why}", path.display()));
                        continue;
                    }
                };
                if value.is_empty() && !item.has_default {
                    continue;
                }
                item.check(value).map_err(|error| ConfigError::Value {
                    key: key.clone(),
                    value: value.clone(),
                    path: path.to_owned(),
                    reason: match error {
                        ItemError::Value { reason, .. } => reason,
                        other => other.to_string(),
                    },
                })?;
                defaults.values.push((item, value.clone()));
            }
        }
        Ok(defaults)
    }
}

impl Defaults<'_> {
    /// `command` with the config values as its flags' defaults (so `--help` shows them); a
    /// required flag with a configured value is required no more (`exchange.expose`).
    pub fn apply(&self, mut command: clap::Command) -> clap::Command {
        for (item, value) in &self.values {
            let set = |arg: clap::Arg| arg.default_value(value.clone()).required(false);
            command = if item.group == "global" {
                command.mut_arg(&item.id, set)
            } else {
                command.mut_subcommand(&item.group, |sub| sub.mut_arg(&item.id, set))
            };
        }
        command
    }
}

/// `dnsMode` → `dns-mode` (v0.3.7 `util.DashSeparated`: a dash before each capital).
pub fn dash_separated(camel: &str) -> String {
    let mut dashed = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            dashed.push('-');
            dashed.push(c.to_ascii_lowercase());
        } else {
            dashed.push(c);
        }
    }
    dashed
}

/// The arguments of `config set`: `<item> <value>`, `<item>=<value>` or `<item> = <value>`
/// (v0.3.7 documents all three; its `<item>=<value>` is broken, `config/set.go`). The value
/// may itself hold `=` (`global.with-label=a=b`).
pub fn set_arguments(args: &[String]) -> Result<(String, String), SetError> {
    match args {
        [one] => one
            .split_once('=')
            .map(|(item, value)| (item.to_owned(), value.to_owned()))
            .ok_or_else(|| SetError::NoValue(one.clone())),
        [item, value] => {
            // `<item>= <value>` and `<item> =<value>` are the `=` form split by the shell.
            let item = item.strip_suffix('=').unwrap_or(item);
            if item.contains('=') {
                return Err(SetError::Form(args.to_vec()));
            }
            Ok((item.to_owned(), value.clone()))
        }
        [item, eq, value] if eq == "=" && !item.contains('=') => Ok((item.clone(), value.clone())),
        _ => Err(SetError::Form(args.to_vec())),
    }
}

/// `config set` arguments that are not one of its forms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    #[error("no value given for '{0}': use `ktctl config set <item> <value>` or `<item>=<value>`")]
    NoValue(String),
    #[error(
        "`ktctl config set` takes '<item> <value>', '<item>=<value>' or '<item> = <value>', \
         not {0:?}"
    )]
    Form(Vec<String>),
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;
    use crate::args::Cli;

    fn items() -> Items {
        Items::from_command(&Cli::command())
    }

    fn keys() -> Vec<String> {
        items().iter().map(Item::key).collect()
    }

    #[test]
    fn items_are_derived_from_every_long_flag() {
        let keys = keys();
        for key in [
            // v0.3.7's names.
            "connect.dns-mode",
            "connect.disable-pod-ip",
            "connect.dns-cache-ttl",
            "exchange.recover-wait-time",
            "exchange.expose",
            "mesh.version-mark",
            "mesh.router-image",
            "preview.external",
            "global.pod-creation-timeout",
            "global.kubeconfig",
            "global.image-pull-secret",
            // kt's own flags.
            "connect.via",
            "exchange.allow-unserved-ports",
            "preview.mode",
            "global.transport",
            "global.ssh-connections",
        ] {
            assert!(
                keys.contains(&key.to_owned()),
                "{key} missing from {keys:?}"
            );
        }
        for absent in [
            "global.as-worker",
            "global.version",
            "global.help",
            "exchange.service",
            "forward.target",
        ] {
            assert!(!keys.contains(&absent.to_owned()), "{absent} in {keys:?}");
        }
        // Subcommands first, in the tree's order, globals last.
        assert!(keys.first().unwrap().starts_with("connect."), "{keys:?}");
        assert!(keys.last().unwrap().starts_with("global."), "{keys:?}");
    }

    #[test]
    fn a_new_command_gets_its_items_without_a_list() {
        let command = Cli::command().subcommand(
            // A made-up command: real ones get their items the same way.
            clap::Command::new("sweep")
                .arg(clap::Arg::new("threshold").long("thresholdInMinus"))
                .arg(clap::Arg::new("dry").long("dryRun").hide(true)),
        );
        let keys: Vec<_> = Items::from_command(&command)
            .iter()
            .map(Item::key)
            .collect();
        assert!(keys.contains(&"sweep.threshold-in-minus".to_owned()));
        assert!(
            !keys.contains(&"sweep.dry-run".to_owned()),
            "hidden flags are no items"
        );
        // And the real `clean` has its v0.3.7 items.
        for key in [
            "clean.threshold-in-minus",
            "clean.dry-run",
            "birdseye.sort-by",
        ] {
            assert!(keys.contains(&key.to_owned()), "{key} in {keys:?}");
        }
    }

    #[test]
    fn dash_separated_names() {
        assert_eq!(dash_separated("dnsMode"), "dns-mode");
        assert_eq!(dash_separated("portForwardTimeout"), "port-forward-timeout");
        assert_eq!(dash_separated("kubeconfig"), "kubeconfig");
    }

    #[test]
    fn lookups_name_what_is_wrong() {
        let items = items();
        assert_eq!(items.lookup("connect.dns-mode").unwrap().flag, "dnsMode");
        assert_eq!(
            items.lookup("connect.dnsMode").unwrap_err().to_string(),
            "invalid config item 'connect.dnsMode': items are dash-separated, try \
             'connect.dns-mode'"
        );
        assert_eq!(
            items.lookup("connect.dns-port").unwrap_err(),
            ItemError::Unsupported {
                key: "connect.dns-port".into(),
                why: "v0.3.7's --dnsPort exists on macOS only, and kt runs on Linux"
            }
        );
        for key in [
            "connect.include-domains",
            "connect.global",
            "global.listen-check",
            "global.ip-version",
            "global.as-worker",
        ] {
            assert!(
                matches!(items.lookup(key), Err(ItemError::Unsupported { .. })),
                "{key}"
            );
        }
        assert_eq!(
            items.lookup("global.asWorker").unwrap_err(),
            ItemError::CamelCase {
                given: "global.asWorker".into(),
                suggestion: "global.as-worker".into()
            }
        );
        assert_eq!(
            items.lookup("connect.bogus").unwrap_err(),
            ItemError::Unknown("connect.bogus".into())
        );
        assert_eq!(
            items.lookup("connect.noSuchFlag").unwrap_err(),
            ItemError::Unknown("connect.noSuchFlag".into())
        );
        for bad in ["debug", ".debug", "global.", "a.b.c", "global.de bug"] {
            assert_eq!(
                items.lookup(bad).unwrap_err(),
                ItemError::Shape(bad.into()),
                "{bad}"
            );
        }
    }

    #[test]
    fn values_are_checked_with_the_flags_parser() {
        let items = items();
        assert!(items.check("exchange.mode", "scale").is_ok());
        assert_eq!(
            items
                .check("exchange.mode", "bogus")
                .unwrap_err()
                .to_string(),
            "invalid value 'bogus' for config item exchange.mode: possible values: auto, \
             agent, selector, scale, ephemeral"
        );
        assert_eq!(
            items
                .check("global.debug", "maybe")
                .unwrap_err()
                .to_string(),
            "invalid value 'maybe' for config item global.debug: invalid boolean value 'maybe'"
        );
        assert!(items.check("global.debug", "T").is_ok());
        assert!(items.check("global.pod-creation-timeout", "soon").is_err());
        assert!(items.check("global.ssh-connections", "0").is_err());
        assert!(items.check("global.ssh-connections", "16").is_ok());
        assert!(items.check("connect.proxy-port", "70000").is_err());
        assert!(items.check("global.transport", "portForward").is_ok());
        // Any text, including one that starts with a dash or is empty.
        assert!(items.check("connect.exclude-ips", "-x").is_ok());
        assert!(items.check("global.with-label", "").is_ok());
    }

    #[test]
    fn set_takes_its_three_forms() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let pair = |i: &str, v: &str| Ok((i.to_owned(), v.to_owned()));
        assert_eq!(set_arguments(&args(&["a.b", "c"])), pair("a.b", "c"));
        assert_eq!(set_arguments(&args(&["a.b=c"])), pair("a.b", "c"));
        assert_eq!(set_arguments(&args(&["a.b", "=", "c"])), pair("a.b", "c"));
        assert_eq!(set_arguments(&args(&["a.b=", "c"])), pair("a.b", "c"));
        assert_eq!(set_arguments(&args(&["a.b=k=v"])), pair("a.b", "k=v"));
        assert_eq!(set_arguments(&args(&["a.b", "k=v"])), pair("a.b", "k=v"));
        assert_eq!(set_arguments(&args(&["a.b="])), pair("a.b", ""));
        assert_eq!(
            set_arguments(&args(&["a.b"])),
            Err(SetError::NoValue("a.b".into()))
        );
        for bad in [
            &["a.b", "c", "d"][..],
            &["a.b", "=", "c", "d"],
            &["a=b", "c"],
            &[],
        ] {
            assert_eq!(
                set_arguments(&args(bad)),
                Err(SetError::Form(args(bad))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn config_values_become_defaults_and_bad_ones_name_item_value_and_file() {
        let items = items();
        let path = Path::new("/h/.kt/config");
        let groups = crate::config::parse(
            path,
            "exchange:\n  expose: '8080'\n  mode: scale\nglobal:\n  namespace: ''\n  \
             image: mine\nconnect:\n  dns-port: '53'\n",
        )
        .unwrap();
        let defaults = items.defaults(&groups, path).unwrap();
        let set: Vec<_> = defaults
            .values
            .iter()
            .map(|(i, v)| format!("{}={v}", i.key()))
            .collect();
        assert_eq!(
            set,
            [
                "exchange.expose=8080",
                "exchange.mode=scale",
                "global.image=mine"
            ]
        );
        assert_eq!(defaults.ignored.len(), 1);
        assert!(
            defaults.ignored[0].contains("connect.dns-port"),
            "{:?}",
            defaults.ignored
        );
        let command = defaults.apply(Cli::command());
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(
            &command
                .try_get_matches_from(["ktctl", "exchange", "web"])
                .unwrap(),
        )
        .unwrap();
        let Some(crate::args::Command::Exchange(exchange)) = cli.command else {
            panic!("not exchange");
        };
        assert_eq!(exchange.expose, "8080");
        assert_eq!(exchange.mode, crate::args::ExchangeMode::Scale);
        assert_eq!(cli.global.image, "mine");
        assert_eq!(cli.global.namespace, None, "an empty value leaves -n unset");
        // A configured image is still a customised one (compared with the built-in).
        let settings = crate::settings::Settings::from_args(&cli.global).unwrap();
        assert_eq!(settings.shadow.customised, ["--image"]);

        let bad = crate::config::parse(path, "exchange:\n  mode: bogus\n").unwrap();
        let err = items.defaults(&bad, path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value 'bogus' for config item exchange.mode in /h/.kt/config: possible \
             values: auto, agent, selector, scale, ephemeral; change it with `ktctl config set \
             exchange.mode <value>` or remove it with `ktctl config unset exchange.mode`"
        );
    }

    #[test]
    fn flags_override_config_defaults() {
        let items = items();
        let path = Path::new("/h/.kt/config");
        let groups =
            crate::config::parse(path, "global:\n  kubeconfig: /a\n  debug: 'true'\n").unwrap();
        let command = items.defaults(&groups, path).unwrap().apply(Cli::command());
        let parse = |args: &[&str]| {
            let matches = command
                .clone()
                .try_get_matches_from(std::iter::once("ktctl").chain(args.iter().copied()))
                .unwrap();
            <Cli as clap::FromArgMatches>::from_arg_matches(&matches)
                .unwrap()
                .global
        };
        let g = parse(&["forward", "svc"]);
        assert_eq!((g.kubeconfig.as_str(), g.debug), ("/a", true));
        let g = parse(&["forward", "svc", "-c", "/b", "--debug=false"]);
        assert_eq!((g.kubeconfig.as_str(), g.debug), ("/b", false));
        let help = command
            .clone()
            .try_get_matches_from(["ktctl", "forward", "--help"])
            .unwrap_err()
            .to_string();
        assert!(help.contains("[default: /a]"), "{help}");
    }
}

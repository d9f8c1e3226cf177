//! `~/.kt/config`: the defaults of every command's flags, as in ktctl v0.3.7
//! (`options/option_config.go`). The file is YAML, `<group>: {<item>: <value>}`, with the
//! items named in [`items`]; at startup its values become the flags' clap defaults
//! (flag > config > built-in), so `--help` shows them.
//!
//! kt has no compiled-in config file (v0.3.7's `hack/kt/config`): every value shown by
//! `ktctl config` comes from `~/.kt/config`, and the `(build-in)` marker never appears.

pub mod items;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::lifecycle::{self, LifecycleError};

/// The file's content: group → item → value (v0.3.7's `map[string]map[string]string`).
pub type Groups = BTreeMap<String, BTreeMap<String, String>>;

/// `~/.kt/config` and `~/.kt/profile/<name>` as files.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid YAML", path.display())]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    /// Valid YAML, but not `<group>: {<item>: <value>}`.
    #[error("{} is not a kt config ('<group>: {{<item>: <value>}}'): {what}", path.display())]
    Shape { path: PathBuf, what: String },
    /// A value the item's flag does not accept (found at startup, before any cluster call).
    #[error(
        "invalid value '{value}' for config item {key} in {}: {reason}; change it with \
         `ktctl config set {key} <value>` or remove it with `ktctl config unset {key}`",
        path.display()
    )]
    Value {
        key: String,
        value: String,
        path: PathBuf,
        reason: String,
    },
    #[error("failed to render the config as YAML")]
    Render(#[source] serde_yaml::Error),
    #[error(transparent)]
    Write(#[from] LifecycleError),
}

/// `~/.kt/config`.
pub fn path() -> PathBuf {
    lifecycle::kt_home().join("config")
}

/// Parses the text of a config file (`path` names it in errors). Scalars of any YAML type
/// are taken as their text (`proxy-port: 2223`, `debug: true`), as Go's YAML does for a
/// `map[string]string`; an empty file, an empty group or an empty value is allowed.
pub fn parse(path: &Path, text: &str) -> Result<Groups, ConfigError> {
    use serde_yaml::Value;
    let shape = |what: String| ConfigError::Shape {
        path: path.to_owned(),
        what,
    };
    let root: Value = serde_yaml::from_str(text).map_err(|source| ConfigError::Yaml {
        path: path.to_owned(),
        source,
    })?;
    let root = match root {
        Value::Null => return Ok(Groups::new()),
        Value::Mapping(map) => map,
        _ => return Err(shape("the top level is not a map".into())),
    };
    let mut groups = Groups::new();
    for (group, entries) in root {
        let group = scalar(&group).ok_or_else(|| shape("a group name is not text".into()))?;
        let entries = match entries {
            Value::Null => serde_yaml::Mapping::new(),
            Value::Mapping(map) => map,
            _ => return Err(shape(format!("group '{group}' is not a map"))),
        };
        let items = groups.entry(group.clone()).or_default();
        for (item, value) in entries {
            let item = scalar(&item)
                .ok_or_else(|| shape(format!("an item name in group '{group}' is not text")))?;
            let value = match value {
                Value::Null => String::new(),
                other => scalar(&other)
                    .ok_or_else(|| shape(format!("the value of {group}.{item} is not text")))?,
            };
            items.insert(item, value);
        }
    }
    Ok(groups)
}

/// The text of a YAML scalar (string, number or boolean).
fn scalar(value: &serde_yaml::Value) -> Option<String> {
    use serde_yaml::Value;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The YAML text of `groups`, without empty groups; `{}` when there is nothing (what
/// `config unset --all` writes).
pub fn render(groups: &Groups) -> Result<String, ConfigError> {
    let kept: Groups = groups
        .iter()
        .filter(|(_, items)| !items.is_empty())
        .map(|(group, items)| (group.clone(), items.clone()))
        .collect();
    serde_yaml::to_string(&kept).map_err(ConfigError::Render)
}

/// Reads and parses a config file; a missing file is an empty config.
pub fn load(path: &Path) -> Result<Groups, ConfigError> {
    match read(path)? {
        Some(text) => parse(path, &text),
        None => Ok(Groups::new()),
    }
}

/// The text of `path`, or `None` when it does not exist.
pub fn read(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `text` to a file under `~/.kt` with v0.3.7's mode 0644 (creating `~/.kt` and
/// chowning to the sudo user as [`lifecycle::write_file`] does).
pub fn write(path: &Path, text: &str) -> Result<(), ConfigError> {
    Ok(lifecycle::write_file(path, text.as_bytes(), 0o644)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Groups, ConfigError> {
        parse(Path::new("/h/.kt/config"), text)
    }

    #[test]
    fn the_reference_example_parses() {
        let groups = parse_text(
            "connect:\n  dns-mode: hosts:default,dev\n  exclude-ips: 172.2.1.0/24\n\
             global:\n  image: my.registry/kt-connect-shadow:v0.3.7\n",
        )
        .unwrap();
        assert_eq!(groups["connect"]["dns-mode"], "hosts:default,dev");
        assert_eq!(groups["connect"]["exclude-ips"], "172.2.1.0/24");
        assert_eq!(
            groups["global"]["image"],
            "my.registry/kt-connect-shadow:v0.3.7"
        );
    }

    #[test]
    fn scalars_of_any_type_are_text_and_empty_parts_are_allowed() {
        let groups =
            parse_text("connect:\n  proxy-port: 2223\n  share-shadow: true\n  mode:\nmesh:\n")
                .unwrap();
        assert_eq!(groups["connect"]["proxy-port"], "2223");
        assert_eq!(groups["connect"]["share-shadow"], "true");
        assert_eq!(groups["connect"]["mode"], "");
        assert!(groups["mesh"].is_empty());
        assert!(parse_text("").unwrap().is_empty());
        assert!(parse_text("{}\n").unwrap().is_empty());
    }

    #[test]
    fn malformed_files_are_named_with_what_is_wrong() {
        let err = parse_text("connect: [a, b]\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/h/.kt/config is not a kt config ('<group>: {<item>: <value>}'): group 'connect' \
             is not a map"
        );
        let err = parse_text("global:\n  image: [x]\n").unwrap_err();
        assert!(
            err.to_string()
                .ends_with("the value of global.image is not text"),
            "{err}"
        );
        let err = parse_text("- a\n").unwrap_err();
        assert!(
            err.to_string().ends_with("the top level is not a map"),
            "{err}"
        );
        let err = parse_text("connect: {mode: tun2socks\n").unwrap_err();
        assert!(matches!(err, ConfigError::Yaml { .. }), "{err:?}");
        assert_eq!(err.to_string(), "/h/.kt/config is not valid YAML");
    }

    #[test]
    fn render_round_trips_and_drops_empty_groups() {
        let mut groups = Groups::new();
        groups
            .entry("global".into())
            .or_default()
            .insert("debug".into(), "true".into());
        groups
            .entry("connect".into())
            .or_default()
            .insert("dns-mode".into(), "hosts:default,dev".into());
        groups.entry("mesh".into()).or_default();
        let text = render(&groups).unwrap();
        groups.remove("mesh");
        assert_eq!(parse_text(&text).unwrap(), groups, "{text}");
        assert!(!text.contains("mesh"), "{text}");
        assert_eq!(render(&Groups::new()).unwrap(), "{}\n");
    }
}

//! `ktctl config`: show, get, set and unset the defaults of the commands' flags in
//! `~/.kt/config`, and keep named copies of it in `~/.kt/profile/<name>` (ktctl v0.3.7
//! `config/*.go`). `show`, `get`, `list-profile` and `load-profile --dryRun` print plain
//! text to stdout; the rest print nothing there.
//!
//! Fixed from v0.3.7: `set <item>=<value>` works (v0.3.7's condition is inverted and a
//! single argument panics), `save-profile` works (v0.3.7 checks its name pattern against
//! the whole path, so every name is refused), `load-profile --dryRun` prints the profile's
//! text (v0.3.7 prints a Go byte slice). Nothing is written when an argument is refused.

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;

use crate::{
    args::{Cli, ConfigAction},
    config::{
        self, ConfigError, Groups,
        items::{self, ItemError, Items, SetError},
    },
    lifecycle,
};

/// Why a `config` subcommand failed; each names the item, value, profile or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Item(#[from] ItemError),
    #[error(transparent)]
    Set(#[from] SetError),
    #[error("no item given: `ktctl config unset <item>...`, or `--all` for every item")]
    NoItem,
    #[error("`--all` unsets every item: give it no item names (got '{0}')")]
    AllWithItems(String),
    #[error(
        "invalid profile name '{0}': use at most 255 letters, digits, '-', '_' and '.', not starting with '.'"
    )]
    ProfileName(String),
    #[error("profile '{name}' not found ({} does not exist)", path.display())]
    NoProfile { name: String, path: PathBuf },
    #[error(
        "profile '{0}' already exists and stdin is not a terminal to ask whether to overwrite \
         it: add --force to overwrite it"
    )]
    ProfileExists(String),
    #[error("failed to read the answer from stdin")]
    Answer(#[source] std::io::Error),
    #[error("failed to {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `ktctl config <action>` on `~/.kt/config` and `~/.kt/profile/`.
pub fn run(action: &ConfigAction) -> Result<(), ConfigCommandError> {
    let items = Items::from_command(&Cli::command());
    let path = config::path();
    let profiles = lifecycle::kt_home().join("profile");
    match action {
        ConfigAction::Show { all } => print(&show(&items, &config::load(&path)?, *all)),
        ConfigAction::Get { items: keys } => print(&get(&items, &config::load(&path)?, keys)?),
        ConfigAction::Set { args } => {
            let (key, value) = items::set_arguments(args)?;
            let item = items.check(&key, &value)?;
            let mut groups = config::load(&path)?;
            groups
                .entry(item.group.clone())
                .or_default()
                .insert(item.name.clone(), value);
            config::write(&path, &config::render(&groups)?)?;
        }
        ConfigAction::Unset { items: keys, all } => {
            let groups = if *all {
                if !keys.is_empty() {
                    return Err(ConfigCommandError::AllWithItems(keys.join(" ")));
                }
                // Not read first: `unset --all` also clears a file that does not parse.
                Groups::new()
            } else if keys.is_empty() {
                return Err(ConfigCommandError::NoItem);
            } else {
                let mut groups = config::load(&path)?;
                unset(&items, &mut groups, keys)?;
                groups
            };
            config::write(&path, &config::render(&groups)?)?;
        }
        ConfigAction::ListProfile => print(&list(&list_profiles(&profiles)?)),
        ConfigAction::SaveProfile { name, force } => {
            save_profile(&path, &profiles, name, *force)?;
        }
        ConfigAction::LoadProfile { name, dry_run } => {
            check_profile_name(name)?;
            let file = profiles.join(name);
            let text = config::read(&file)?.ok_or_else(|| ConfigCommandError::NoProfile {
                name: name.clone(),
                path: file.clone(),
            })?;
            if *dry_run {
                print(&with_newline(text));
            } else {
                // A profile that does not parse would break every command: refuse it.
                config::parse(&file, &text)?;
                config::write(&path, &text)?;
                tracing::info!("Profile '{name}' loaded");
            }
        }
        ConfigAction::DropProfile { name } => {
            check_profile_name(name)?;
            let file = profiles.join(name);
            match std::fs::remove_file(&file) {
                Ok(()) => tracing::info!("Profile '{name}' dropped"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ConfigCommandError::NoProfile {
                        name: name.clone(),
                        path: file,
                    });
                }
                Err(source) => {
                    return Err(ConfigCommandError::Io {
                        what: "delete",
                        path: file,
                        source,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Writes `text` to stdout; a closed stdout (`| head -1`) is not worth reporting.
fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn with_newline(mut text: String) -> String {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// The value `groups` holds for `key` (`<group>.<item>`).
fn value<'a>(groups: &'a Groups, key: &str) -> Option<&'a String> {
    let (group, name) = key.split_once('.')?;
    groups.get(group)?.get(name)
}

/// `config show`: `group.item = value` per configured item, in the items' order; with
/// `all`, unset items as a bare `group.item`. Entries that are no kt item (a v0.3.7
/// config's `connect.dns-port`) follow as they are, except `global.as-worker`, which v0.3.7
/// hides.
pub fn show(items: &Items, groups: &Groups, all: bool) -> String {
    let mut text = String::new();
    for item in items.iter() {
        let key = item.key();
        match value(groups, &key) {
            Some(value) => text.push_str(&format!("{key} = {value}\n")),
            None if all => text.push_str(&format!("{key}\n")),
            None => {}
        }
    }
    for (group, entries) in groups {
        for (name, value) in entries {
            let key = format!("{group}.{name}");
            if items.lookup(&key).is_err() && key != "global.as-worker" {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
    }
    text
}

/// `config get`: `item = value`, or `item = <empty>` for an item without a value; an item
/// name that is neither kt's, nor v0.3.7's, nor in the file is an error (and nothing is
/// printed).
pub fn get(items: &Items, groups: &Groups, keys: &[String]) -> Result<String, ItemError> {
    let mut text = String::new();
    for key in keys {
        match value(groups, key).filter(|v| !v.is_empty()) {
            Some(value) => text.push_str(&format!("{key} = {value}\n")),
            None => {
                known(items, key)?;
                text.push_str(&format!("{key} = <empty>\n"));
            }
        }
    }
    Ok(text)
}

/// Whether `key` names an item, kt's or a v0.3.7 one kt has no flag for.
fn known(items: &Items, key: &str) -> Result<(), ItemError> {
    match items.lookup(key) {
        Ok(_) | Err(ItemError::Unsupported { .. }) => Ok(()),
        Err(other) => Err(other),
    }
}

/// `config unset`: removes `keys` from `groups`; an item that is not set is fine, a name
/// that is no item (and not in the file) is an error.
pub fn unset(items: &Items, groups: &mut Groups, keys: &[String]) -> Result<(), ItemError> {
    for key in keys {
        if value(groups, key).is_none() {
            known(items, key)?;
        }
    }
    for key in keys {
        if let Some((group, name)) = key.split_once('.')
            && let Some(entries) = groups.get_mut(group)
        {
            entries.remove(name);
        }
    }
    groups.retain(|_, entries| !entries.is_empty());
    Ok(())
}

/// A profile name is a file name of `~/.kt/profile/`: letters, digits, `-`, `_` and `.`,
/// not starting with `.` (so never `..` or a hidden file), at most 255 bytes (`NAME_MAX`
/// of Linux file systems; longer failed only when the file was written).
pub fn check_profile_name(name: &str) -> Result<(), ConfigCommandError> {
    let valid = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    valid
        .then_some(())
        .ok_or_else(|| ConfigCommandError::ProfileName(name.to_owned()))
}

/// The profiles in `dir` (files with a valid profile name) and their modification times,
/// by name; none when `dir` does not exist.
fn list_profiles(dir: &Path) -> Result<Vec<(String, chrono::NaiveDateTime)>, ConfigCommandError> {
    let fail = |source| ConfigCommandError::Io {
        what: "list",
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(fail(source)),
    };
    let mut profiles = Vec::new();
    for entry in entries {
        let entry = entry.map_err(fail)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let metadata = entry.metadata().map_err(fail)?;
        if !metadata.is_file() || check_profile_name(&name).is_err() {
            continue;
        }
        let saved = chrono::DateTime::<chrono::Local>::from(metadata.modified().map_err(fail)?);
        profiles.push((name, saved.naive_local()));
    }
    profiles.sort();
    Ok(profiles)
}

/// `config list-profile`: v0.3.7's header, then `YYYY-MM-DD HH:MM:SS\t\t<name>` per
/// profile (its file's modification time, local).
pub fn list(profiles: &[(String, chrono::NaiveDateTime)]) -> String {
    let mut text = String::from("Save Date          \t\tName\n");
    for (name, saved) in profiles {
        text.push_str(&format!(
            "{}\t\t{name}\n",
            saved.format("%Y-%m-%d %H:%M:%S")
        ));
    }
    text
}

/// `config save-profile`: copies `~/.kt/config` (an empty config when there is none) to
/// the profile. An existing profile is overwritten with `force`, or when the user answers
/// `Y` on a terminal (v0.3.7's question); without a terminal to ask it is refused.
fn save_profile(
    config: &Path,
    profiles: &Path,
    name: &str,
    force: bool,
) -> Result<(), ConfigCommandError> {
    check_profile_name(name)?;
    let text = config::read(config)?.unwrap_or_else(|| "{}\n".into());
    // A config that does not parse is not worth keeping, and would break a later load.
    config::parse(config, &text)?;
    let file = profiles.join(name);
    if file.exists() && !force {
        if !std::io::stdin().is_terminal() {
            return Err(ConfigCommandError::ProfileExists(name.to_owned()));
        }
        print(&format!(
            "Profile '{name}' already exists, overwrite ? (Y/N) "
        ));
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(ConfigCommandError::Answer)?;
        if !answer.trim().eq_ignore_ascii_case("y") {
            tracing::info!("Profile '{name}' is kept as it was");
            return Ok(());
        }
    }
    config::write(&file, &text)?;
    tracing::info!("Profile '{name}' saved");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn items() -> Items {
        Items::from_command(&Cli::command())
    }

    fn groups(text: &str) -> Groups {
        config::parse(Path::new("/h/.kt/config"), text).unwrap()
    }

    fn keys(list: &[&str]) -> Vec<String> {
        list.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn show_lists_set_items_in_table_order_and_all_adds_bare_unset_ones() {
        let groups = groups(
            "global:\n  image: mine\n  as-worker: 'true'\nconnect:\n  dns-mode: hosts\n  \
             dns-port: '53'\n",
        );
        let items = items();
        assert_eq!(
            show(&items, &groups, false),
            "connect.dns-mode = hosts\nglobal.image = mine\nconnect.dns-port = 53\n"
        );
        let all = show(&items, &groups, true);
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), items.iter().count() + 1, "{all}");
        assert!(lines.contains(&"connect.dns-mode = hosts"), "{all}");
        assert!(lines.contains(&"exchange.recover-wait-time"), "{all}");
        assert!(lines.contains(&"global.ssh-connections"), "{all}");
        assert!(!all.contains("as-worker"), "{all}");
        assert!(!all.contains("(build-in)"), "{all}");
        assert_eq!(show(&items, &Groups::new(), false), "");
    }

    #[test]
    fn get_prints_values_or_empty_and_names_an_unknown_item() {
        let groups = groups("connect:\n  dns-mode: hosts\n  dns-port: '53'\n");
        let items = items();
        assert_eq!(
            get(
                &items,
                &groups,
                &keys(&["connect.dns-mode", "global.image", "connect.dns-port"])
            )
            .unwrap(),
            "connect.dns-mode = hosts\nglobal.image = <empty>\nconnect.dns-port = 53\n"
        );
        assert_eq!(
            get(
                &items,
                &groups,
                &keys(&["connect.dns-mode", "connect.nope"])
            )
            .unwrap_err(),
            ItemError::Unknown("connect.nope".into())
        );
        assert!(matches!(
            get(&items, &groups, &keys(&["connect.dnsMode"])),
            Err(ItemError::CamelCase { .. })
        ));
    }

    #[test]
    fn unset_removes_items_and_refuses_unknown_ones_without_changing_anything() {
        let items = items();
        let mut g = groups("connect:\n  dns-mode: hosts\n  weird: x\nglobal:\n  debug: 'true'\n");
        unset(
            &items,
            &mut g,
            &keys(&["connect.dns-mode", "connect.weird", "global.image"]),
        )
        .unwrap();
        assert_eq!(g, groups("global:\n  debug: 'true'\n"));
        let before = g.clone();
        assert_eq!(
            unset(&items, &mut g, &keys(&["global.debug", "global.bogus"])).unwrap_err(),
            ItemError::Unknown("global.bogus".into())
        );
        assert_eq!(g, before);
    }

    #[test]
    fn profile_names_are_checked_not_paths() {
        let longest = "p".repeat(255);
        for good in ["p1", "dev.cluster-a", "A_b.2", "x..y", longest.as_str()] {
            assert!(check_profile_name(good).is_ok(), "{good}");
        }
        let too_long = "p".repeat(256);
        for bad in [
            "",
            ".hidden",
            "..",
            "a/b",
            "../x",
            "a b",
            "é",
            too_long.as_str(),
        ] {
            let err = check_profile_name(bad).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid profile name '{bad}': use at most 255 letters, digits, '-', '_' \
                     and '.', not starting with '.'"
                )
            );
        }
    }

    #[test]
    fn list_uses_v0_3_7_columns() {
        let saved = chrono::NaiveDate::from_ymd_opt(2024, 3, 5)
            .unwrap()
            .and_hms_opt(7, 8, 9)
            .unwrap();
        assert_eq!(
            list(&[("a".into(), saved), ("b".into(), saved)]),
            "Save Date          \t\tName\n2024-03-05 07:08:09\t\ta\n2024-03-05 07:08:09\t\tb\n"
        );
        assert_eq!(list(&[]), "Save Date          \t\tName\n");
    }
}

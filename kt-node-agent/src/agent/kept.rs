//! Values computed from one session each, kept from pass to pass (issue 17): with 1 000
//! sessions, computing every session's hash, trust verdict and acknowledgement afresh on
//! every pass was most of a pass, and between two passes few sessions change. The API
//! server gives every change of an object a new `resourceVersion`, so a session at the
//! version a value was computed from still gives that value.
//!
//! The maps a pass looks up once per session or Service (here, in [`super::index`],
//! [`super::ledger`] and [`super::events`]) hash with foldhash (hashbrown's own default),
//! not std's SipHash: `perf` of the `agent_scale` benchmark put hashing and comparing short
//! `namespace/name` keys at a fifth of a pass with 1 000 sessions. Its seed is random per
//! process and per map, which makes colliding names hard to choose ahead of time (foldhash
//! claims only minimal HashDoS resistance: enough for the thousands of names a developer
//! can create in a namespace).

use foldhash::HashMap;

use kt_proto::session::KtSession;

/// Per session (by `namespace/name`), a value `V` and the other inputs `I` it was computed
/// from besides the session itself. A kept value stands while the session has the uid and
/// `resourceVersion` it had (a session deleted and created again under its name is another
/// object) and its inputs match. Keyed by name, not uid, so a caller that files values by
/// name elsewhere (acknowledgements) meets one entry per name.
#[derive(Debug)]
pub struct PerSession<I, V> {
    entries: HashMap<String, Entry<I, V>>,
    /// Counts [`PerSession::start_pass`], to find the sessions a pass did not see.
    pass: u64,
    /// How many entries this pass saw: when all, none is gone.
    seen: usize,
    /// Where a session's key is written, so a lookup allocates nothing.
    key: String,
}

#[derive(Debug)]
struct Entry<I, V> {
    uid: Option<String>,
    /// `None` when the value may not be reused: the session had no `resourceVersion` (not
    /// from an API server), or the caller said so.
    version: Option<String>,
    inputs: I,
    value: V,
    /// The last pass that saw the session.
    seen: u64,
}

impl<I, V> Default for PerSession<I, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::default(),
            pass: 0,
            seen: 0,
            key: String::new(),
        }
    }
}

impl<I, V> PerSession<I, V> {
    /// Starts a pass: the sessions it does not look up or keep are forgotten by
    /// [`PerSession::forget_unseen`].
    pub fn start_pass(&mut self) {
        self.pass += 1;
        self.seen = 0;
    }

    /// The value kept for `session` when it is the same object at the same version and
    /// `same_inputs` holds for the inputs it was computed from; marks the session seen.
    pub fn kept(
        &mut self,
        session: &KtSession,
        same_inputs: impl FnOnce(&I) -> bool,
    ) -> Option<&V> {
        self.kept_mut(session, same_inputs).map(|value| &*value)
    }

    /// [`PerSession::kept`] for a caller that wrote the session's `key` ([`write_key`])
    /// already.
    pub fn kept_at(
        &mut self,
        key: &str,
        session: &KtSession,
        same_inputs: impl FnOnce(&I) -> bool,
    ) -> Option<&V> {
        self.kept_in(Some(key), session, same_inputs)
            .map(|value| &*value)
    }

    /// [`PerSession::kept`], for a value that holds parts of its own to bring up to date.
    pub fn kept_mut(
        &mut self,
        session: &KtSession,
        same_inputs: impl FnOnce(&I) -> bool,
    ) -> Option<&mut V> {
        self.kept_in(None, session, same_inputs)
    }

    /// The entry of `session` (at `key`, else at the key written here) if it still holds.
    fn kept_in(
        &mut self,
        key: Option<&str>,
        session: &KtSession,
        same_inputs: impl FnOnce(&I) -> bool,
    ) -> Option<&mut V> {
        let key = match key {
            Some(key) => {
                debug_assert_eq!(key, session.key(), "the session's own key");
                key
            }
            None => {
                write_key(&mut self.key, session);
                self.key.as_str()
            }
        };
        let meta = &session.metadata;
        let entry = self.entries.get_mut(key)?;
        let same = entry.version.is_some()
            && entry.version == meta.resource_version
            && entry.uid == meta.uid
            && same_inputs(&entry.inputs);
        if !same {
            return None;
        }
        if entry.seen != self.pass {
            entry.seen = self.pass;
            self.seen += 1;
        }
        Some(&mut entry.value)
    }

    /// Keeps `value`, computed from `session` and `inputs`, in place of what the session's
    /// name had (returned), and marks the session seen. With `reusable` false the value is
    /// only held (for [`PerSession::forget_unseen`] to return): no lookup reuses it.
    pub fn keep(&mut self, session: &KtSession, inputs: I, value: V, reusable: bool) -> Option<V> {
        write_key(&mut self.key, session);
        let meta = &session.metadata;
        let entry = Entry {
            uid: meta.uid.clone(),
            version: meta.resource_version.clone().filter(|_| reusable),
            inputs,
            value,
            seen: self.pass,
        };
        let old = self.entries.insert(self.key.clone(), entry);
        if old.as_ref().is_none_or(|old| old.seen != self.pass) {
            self.seen += 1;
        }
        old.map(|old| old.value)
    }

    /// Forgets the sessions this pass did not see (found by [`PerSession::kept`] or given
    /// to [`PerSession::keep`]); returns their values. Walks the entries only when some
    /// were not seen.
    pub fn forget_unseen(&mut self) -> Vec<V> {
        if self.entries.len() == self.seen {
            return Vec::new();
        }
        let pass = self.pass;
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.seen != pass)
            .map(|(key, _)| key.clone())
            .collect();
        gone.iter()
            .filter_map(|key| self.entries.remove(key))
            .map(|entry| entry.value)
            .collect()
    }

    /// Forgets the value of the session `key` (`namespace/name`, as [`write_key`] writes
    /// it): something it was computed from besides the session changed.
    pub fn forget(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key)
            && entry.seen == self.pass
        {
            self.seen -= 1;
        }
    }

    /// Forgets every value: what they were computed from besides the sessions changed.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.seen = 0;
    }
}

/// Writes `namespace/name` of `session` to `key`, which it clears first: what
/// [`KtSession::key`] gives, without allocating once `key` is large enough (and without
/// the formatting machinery, a tenth of a pass with 1 000 sessions: issue 17).
pub fn write_key(key: &mut String, session: &KtSession) {
    let meta = &session.metadata;
    write_name_key(
        key,
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    );
}

/// Writes `namespace/name` to `key`, which it clears first ([`write_key`] of a session
/// known by name).
pub fn write_name_key(key: &mut String, namespace: &str, name: &str) {
    key.clear();
    key.push_str(namespace);
    key.push('/');
    key.push_str(name);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn session(namespace: &str, name: &str, uid: &str, version: Option<&str>) -> KtSession {
        serde_json::from_value(json!({
            "apiVersion": "kt.dev/v1alpha1", "kind": "KtSession",
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "resourceVersion": version},
            "spec": {"owner": "a@b", "mode": "exchange", "service": "web",
                     "ports": [{"port": 80, "localPort": 8080}], "publicKey": "k"},
        }))
        .unwrap()
    }

    #[test]
    fn a_value_stands_while_the_session_its_version_and_inputs_do() {
        let mut kept: PerSession<u8, &str> = PerSession::default();
        let a = session("dev", "a", "u1", Some("1"));
        kept.start_pass();
        assert_eq!(kept.kept(&a, |_| true), None, "nothing kept yet");
        assert_eq!(kept.keep(&a, 7, "a@1", true), None);
        assert_eq!(kept.kept(&a, |i| *i == 7), Some(&"a@1"));
        assert_eq!(kept.kept(&a, |i| *i == 8), None, "other inputs");
        let newer = session("dev", "a", "u1", Some("2"));
        assert_eq!(kept.kept(&newer, |_| true), None, "a new version");
        let again = session("dev", "a", "u2", Some("1"));
        assert_eq!(kept.kept(&again, |_| true), None, "created again");
        let other = session("other", "a", "u1", Some("1"));
        assert_eq!(kept.kept(&other, |_| true), None, "another namespace");
        let unversioned = session("dev", "b", "u3", None);
        kept.keep(&unversioned, 0, "b", true);
        assert_eq!(kept.kept(&unversioned, |_| true), None, "no version");
        assert_eq!(kept.keep(&a, 7, "a@1 held", false), Some("a@1"));
        assert_eq!(kept.kept(&a, |_| true), None, "not reusable");
        kept.clear();
        assert!(kept.forget_unseen().is_empty());
    }

    #[test]
    fn the_sessions_a_pass_did_not_see_are_forgotten() {
        let mut kept: PerSession<(), &str> = PerSession::default();
        let (a, b) = (
            session("dev", "a", "u1", Some("1")),
            session("dev", "b", "u2", Some("1")),
        );
        kept.start_pass();
        kept.keep(&a, (), "a", true);
        kept.keep(&b, (), "b", true);
        assert!(kept.forget_unseen().is_empty());
        kept.start_pass();
        assert_eq!(kept.kept(&a, |()| true), Some(&"a"));
        // Looked up twice, and b's lookup misses without a keep: b was not seen.
        assert_eq!(kept.kept(&a, |()| true), Some(&"a"));
        assert_eq!(kept.kept(&b, |()| false), None);
        assert_eq!(kept.forget_unseen(), vec!["b"]);
        kept.start_pass();
        assert_eq!(kept.kept(&a, |()| true), Some(&"a"), "a stays");
        assert_eq!(kept.kept(&b, |()| true), None, "b is gone");
    }
}

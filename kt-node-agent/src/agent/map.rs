//! The eBPF service map as the agent keeps it: what it last wrote, and the difference to
//! write when the desired redirects change.

use std::collections::{BTreeMap, HashMap, HashSet};

use kt_ebpf_common::{Mode, Redirect};

use super::redirects::Target;
use crate::ebpf::{self, ServiceKey};

/// The eBPF side and what was last written to it.
pub(crate) struct RedirectMap {
    pub(crate) redirector: ebpf::Redirector,
    /// The redirects in force, as last applied.
    pub(crate) desired: BTreeMap<ServiceKey, Target>,
    /// What the service map holds, as last written; `None` after a failed write, when only
    /// reading the map tells.
    written: Option<HashMap<ServiceKey, Redirect>>,
    pub(crate) ids: SvcIds,
}

impl RedirectMap {
    /// Takes over a freshly loaded redirector, whose map is empty.
    pub(crate) fn new(redirector: ebpf::Redirector) -> Self {
        Self {
            redirector,
            desired: BTreeMap::new(),
            written: Some(HashMap::new()),
            ids: SvcIds::default(),
        }
    }

    /// Makes the service map equal to `desired`: writes what differs from what it holds,
    /// removes what is not wanted. Connections already redirected stay where they are.
    pub(crate) fn apply(
        &mut self,
        desired: BTreeMap<ServiceKey, Target>,
    ) -> Result<(), ebpf::EbpfError> {
        // Most passes change nothing here (an acknowledgement, another Service's slice): an
        // ordered comparison is far cheaper than hashing every entry to diff it (with 1 000
        // sessions, 4 000 entries; the `agent_scale` benchmark).
        if self.written.is_some() && desired == self.desired {
            return Ok(());
        }
        let current = match self.written.take() {
            Some(written) => written,
            None => self.redirector.entries()?.into_iter().collect(),
        };
        let mut written = HashMap::with_capacity(desired.len());
        for (service, target) in &desired {
            let mode = match target.mode {
                kt_proto::session::SessionMode::Mesh => Mode::Mesh,
                _ => Mode::Exchange,
            };
            let redirect = Redirect::to(target.to, self.ids.id(&target.session), mode);
            if current.get(service) != Some(&redirect) {
                tracing::info!(%service, to = %target.to, session = %target.session, "redirect");
                self.redirector.insert(*service, redirect)?;
            }
            written.insert(*service, redirect);
        }
        for service in current.keys().filter(|s| !desired.contains_key(s)) {
            tracing::info!(%service, "redirect removed");
            self.redirector.remove(*service)?;
        }
        let live: HashSet<&str> = desired.values().map(|t| t.session.as_str()).collect();
        self.ids.retain(|session| live.contains(session));
        self.written = Some(written);
        self.desired = desired;
        Ok(())
    }
}

/// Stable per-session ids for the per-service counters, reused after a session goes.
#[derive(Default)]
pub(crate) struct SvcIds {
    ids: HashMap<String, u32>,
    free: Vec<u32>,
    next: u32,
}

impl SvcIds {
    fn id(&mut self, session: &str) -> u32 {
        if let Some(id) = self.ids.get(session) {
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.ids.insert(session.to_owned(), id);
        id
    }

    /// The id of a session that has one.
    pub(crate) fn get(&self, session: &str) -> Option<u32> {
        self.ids.get(session).copied()
    }

    fn retain(&mut self, live: impl Fn(&str) -> bool) {
        let free = &mut self.free;
        self.ids.retain(|session, id| {
            let keep = live(session);
            if !keep {
                free.push(*id);
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::SvcIds;

    #[test]
    fn service_ids_are_stable_and_reused() {
        let mut ids = SvcIds::default();
        let a = ids.id("dev/a");
        let b = ids.id("dev/b");
        assert_ne!(a, b);
        assert_eq!(ids.id("dev/a"), a);
        ids.retain(|s| s == "dev/b");
        assert_eq!(ids.id("dev/c"), a, "a's id is free again");
        assert_eq!(ids.id("dev/b"), b);
        assert_eq!(ids.get("dev/a"), None);
    }
}

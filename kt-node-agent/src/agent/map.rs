//! The eBPF service map as the agent keeps it: what it last wrote, and the difference to
//! write when the desired redirects change.

use std::collections::{BTreeMap, HashMap};

use kt_ebpf_common::{Mode, Redirect};

use super::{ledger::Change, redirects::Target};
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

    /// Applies `changes` (the [`super::ledger::Ledger`]'s) to the redirects in force and
    /// writes only those to the service map, so a pass costs what changed. After a failed
    /// write, when only reading the map tells what it holds, makes it equal to the
    /// redirects in force entry by entry. Connections already redirected stay where they
    /// are.
    pub(crate) fn apply(&mut self, changes: &[Change]) -> Result<(), ebpf::EbpfError> {
        for (service, target) in changes {
            let old = match target {
                Some(target) => self.desired.insert(*service, target.clone()),
                None => self.desired.remove(service),
            };
            if let Some(old) = old {
                self.ids.release(&old.session);
            }
            if let Some(target) = target {
                self.ids.acquire(&target.session);
            }
        }
        let Some(mut written) = self.written.take() else {
            return self.rewrite();
        };
        for (service, target) in changes {
            match target {
                Some(target) => {
                    let redirect = redirect(&self.ids, target);
                    if written.get(service) != Some(&redirect) {
                        tracing::info!(%service, to = %target.to, session = %target.session, "redirect");
                        self.redirector.insert(*service, redirect)?;
                        written.insert(*service, redirect);
                    }
                }
                None => {
                    if written.remove(service).is_some() {
                        tracing::info!(%service, "redirect removed");
                        self.redirector.remove(*service)?;
                    }
                }
            }
        }
        self.written = Some(written);
        Ok(())
    }

    /// Makes the service map equal to the redirects in force from what reading it tells:
    /// writes what differs, removes what is not wanted.
    fn rewrite(&mut self) -> Result<(), ebpf::EbpfError> {
        let current: HashMap<ServiceKey, Redirect> =
            self.redirector.entries()?.into_iter().collect();
        let desired = &self.desired;
        let mut written = HashMap::with_capacity(desired.len());
        for (service, target) in desired {
            let redirect = redirect(&self.ids, target);
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
        self.written = Some(written);
        Ok(())
    }
}

/// The map value for `target`, with its session's id ([`SvcIds::acquire`]).
fn redirect(ids: &SvcIds, target: &Target) -> Redirect {
    let mode = match target.mode {
        kt_proto::session::SessionMode::Mesh => Mode::Mesh,
        _ => Mode::Exchange,
    };
    Redirect::to(
        target.to,
        ids.get(&target.session).unwrap_or_default(),
        mode,
    )
}

/// Stable per-session ids for the per-service counters, held while the session has an
/// entry in the map and reused after.
#[derive(Default)]
pub(crate) struct SvcIds {
    /// Per session, its id and how many entries hold it.
    ids: HashMap<String, (u32, usize)>,
    free: Vec<u32>,
    next: u32,
}

impl SvcIds {
    /// Counts one more entry of `session`, giving it an id if it has none.
    fn acquire(&mut self, session: &str) -> u32 {
        if let Some((id, entries)) = self.ids.get_mut(session) {
            *entries += 1;
            return *id;
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next
        });
        self.ids.insert(session.to_owned(), (id, 1));
        id
    }

    /// Counts one entry of `session` fewer; its id is free once none is left.
    fn release(&mut self, session: &str) {
        let Some((id, entries)) = self.ids.get_mut(session) else {
            return;
        };
        *entries -= 1;
        if *entries == 0 {
            self.free.push(*id);
            self.ids.remove(session);
        }
    }

    /// The id of a session that has one.
    pub(crate) fn get(&self, session: &str) -> Option<u32> {
        self.ids.get(session).map(|(id, _)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::SvcIds;

    #[test]
    fn service_ids_are_stable_and_reused() {
        let mut ids = SvcIds::default();
        let a = ids.acquire("dev/a");
        let b = ids.acquire("dev/b");
        assert_ne!(a, b);
        assert_eq!(ids.acquire("dev/a"), a, "a second entry of a");
        ids.release("dev/a");
        assert_eq!(ids.get("dev/a"), Some(a), "one entry of a is left");
        ids.release("dev/a");
        assert_eq!(ids.get("dev/a"), None);
        assert_eq!(ids.acquire("dev/c"), a, "a's id is free again");
        assert_eq!(ids.acquire("dev/b"), b);
    }
}

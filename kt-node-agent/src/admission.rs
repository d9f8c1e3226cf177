//! Admission of connections that have not proved anything yet: an SSH client before it logs
//! in, any HTTP client. Each open connection holds a [`Permit`] counted against its source
//! address and against the listener's total; a connection beyond either limit is closed as
//! soon as it is accepted, so that garbage, slowloris and half-open sockets — however many
//! arrive — hold a bounded number of file descriptors and buffers, and one source cannot
//! take every slot from the others.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// How many connections one listener admits at once, per source and in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Per source address (an IPv6 address counts by its /64, the usual allocation of one
    /// host or LAN: one attacker cannot multiply its slots by changing the low bits).
    pub(crate) per_source: usize,
    /// In all.
    pub(crate) total: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refused {
    #[error("{0} connections from this source are already waiting")]
    Source(usize),
    #[error("{0} connections are already waiting")]
    Total(usize),
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// The counts of one listener; cheap to clone (shared).
#[derive(Clone)]
pub(crate) struct Gate {
    limits: Limits,
    counts: Arc<Mutex<Counts>>,
}

impl Gate {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
        }
    }

    /// Admits a connection from `source` if neither its source's count nor the total is at
    /// its limit; the permit counts it until dropped.
    pub(crate) fn admit(&self, source: IpAddr) -> Result<Permit, Refused> {
        let source = source_key(source);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.limits.total {
            return Err(Refused::Total(counts.total));
        }
        let from_source = counts.by_source.entry(source).or_default();
        if *from_source >= self.limits.per_source {
            return Err(Refused::Source(*from_source));
        }
        *from_source += 1;
        counts.total += 1;
        Ok(Permit {
            counts: self.counts.clone(),
            source,
        })
    }

    /// Connections admitted and not yet released: `(total, from source)`.
    #[cfg(test)]
    pub(crate) fn count(&self, source: IpAddr) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from = counts
            .by_source
            .get(&source_key(source))
            .copied()
            .unwrap_or(0);
        (counts.total, from)
    }
}

/// One admitted connection; dropping it frees its slot.
pub(crate) struct Permit {
    counts: Arc<Mutex<Counts>>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if let Some(n) = counts.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.by_source.remove(&self.source);
            }
        }
    }
}

/// The address a source is counted under: IPv4 (also when mapped into IPv6) as is, IPv6 by
/// its /64.
fn source_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_source: 2,
        total: 3,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_source_gets_its_share_and_leaves_the_rest_to_others() {
        let gate = Gate::new(LIMITS);
        let a = [
            gate.admit(ip("10.0.0.1")).unwrap(),
            gate.admit(ip("10.0.0.1")).unwrap(),
        ];
        assert_eq!(gate.admit(ip("10.0.0.1")).err(), Some(Refused::Source(2)));
        let b = gate.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(gate.admit(ip("10.0.0.3")).err(), Some(Refused::Total(3)));
        drop(b);
        let _c = gate.admit(ip("10.0.0.3")).unwrap();
        drop(a);
        assert_eq!(gate.count(ip("10.0.0.1")), (1, 0));
        let _a = gate.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(gate.count(ip("10.0.0.1")), (2, 1));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let gate = Gate::new(LIMITS);
        let _one = gate.admit(ip("2001:db8:1:2::1")).unwrap();
        let _two = gate.admit(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8:1:2::77")).err(),
            Some(Refused::Source(2))
        );
        let _v4 = gate.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(gate.count(ip("10.0.0.1")), (3, 1));
    }

    #[test]
    fn released_permits_leave_no_entry_behind() {
        let gate = Gate::new(LIMITS);
        for i in 0..1000u32 {
            drop(gate.admit(IpAddr::from(i.to_be_bytes())).unwrap());
        }
        assert!(gate.counts.lock().unwrap().by_source.is_empty());
        assert_eq!(gate.count(ip("0.0.0.1")), (0, 0));
    }
}

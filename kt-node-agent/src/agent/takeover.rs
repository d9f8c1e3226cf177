//! Which SSH connection holds each session's listeners. ktctl reconnects when its
//! connection goes silent (a black-holed path, issue 16) and asks for its reverse tunnels
//! again on the new one; from this side the old connection can look alive for a minute
//! more (until the server's keepalive gives up). Both would then renew the session's status
//! with different listeners, each undoing the other's, so the Service's traffic would flip
//! between a live and a dead listener. The newer connection of a session wins: the older
//! one is ended when the newer one holds. Only the session's key can log in, so only the
//! session's own ktctl can take it over.
//!
//! "Newer" is the order in which this agent accepted the connections, not the order of
//! their first status writes: an old connection whose write is slow must not end the
//! connection that replaced it. A connection ended this way is *superseded*: it neither
//! writes this agent's record of the session nor the session's status, nor clears it when
//! it ends (both are its successor's from then on). Ending a connection does not stop a
//! write it has already sent, so every write of a session's record and status takes the
//! session's [`Holders::write_turn`] and checks, holding it, that its connection is not
//! superseded: a write of the old connection that was under way when the new one took
//! over lands before the new one's first write, never after.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

/// A session, `(namespace, name)`.
pub(crate) type SessionKey = (String, String);

/// One SSH connection's identity (its accept order) and the token that ends it.
#[derive(Clone, Debug)]
pub(crate) struct Connection {
    /// Increasing in accept order: a higher id is a newer connection.
    id: u64,
    end: CancellationToken,
    superseded: Arc<AtomicBool>,
}

impl Connection {
    /// A new connection, newer than every one created before it in this process, ended by
    /// `end`. Create it when the connection is accepted.
    pub(crate) fn new(end: CancellationToken) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            end,
            superseded: Arc::default(),
        }
    }

    /// Whether a newer connection of its session took the session over: it must then
    /// neither renew nor clear the session's status.
    pub(crate) fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
        self.end.cancel();
    }
}

/// What [`Holders::take`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// The connection holds the session; no other did (or it already held it).
    Held,
    /// The connection holds the session and the older one that held it was ended.
    TookOver,
    /// A newer connection holds the session: this one is superseded and ended.
    Superseded,
}

/// The connection holding each session's listeners on this agent.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    by_session: Mutex<HashMap<SessionKey, Connection>>,
    /// One lock per session whose record and status writes are under way or may come: taken
    /// around each write ([`Holders::write_turn`]).
    writes: Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Holders {
    /// Makes the newer of `connection` and the session's current holder its holder, and
    /// ends the older one (see the module's doc).
    pub(crate) fn take(&self, session: SessionKey, connection: &Connection) -> Taken {
        let mut by_session = self.by_session.lock().unwrap_or_else(|e| e.into_inner());
        match by_session.get(&session) {
            Some(holder) if holder.id == connection.id => Taken::Held,
            Some(holder) if holder.id > connection.id => {
                connection.supersede();
                Taken::Superseded
            }
            Some(holder) => {
                holder.supersede();
                by_session.insert(session, connection.clone());
                Taken::TookOver
            }
            None => {
                by_session.insert(session, connection.clone());
                Taken::Held
            }
        }
    }

    /// Forgets `session`'s holder if it is still `connection` (it ended); a newer holder
    /// stays. The session's write lock goes too once nobody holds or waits for it.
    pub(crate) fn leave(&self, session: &SessionKey, connection: &Connection) {
        let mut by_session = self.by_session.lock().unwrap_or_else(|e| e.into_inner());
        if by_session
            .get(session)
            .is_some_and(|c| c.id == connection.id)
        {
            by_session.remove(session);
        }
        if !by_session.contains_key(session) {
            self.prune_unlocked(session);
        }
    }

    /// Drops `session`'s write lock if no connection holds the session and nobody holds or
    /// waits for the lock: called by the last writer, after its turn.
    pub(crate) fn prune(&self, session: &SessionKey) {
        let by_session = self.by_session.lock().unwrap_or_else(|e| e.into_inner());
        if !by_session.contains_key(session) {
            self.prune_unlocked(session);
        }
    }

    /// [`Holders::prune`] with `by_session` already locked by the caller.
    fn prune_unlocked(&self, session: &SessionKey) {
        let mut writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if writes
            .get(session)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            writes.remove(session);
        }
    }

    /// Waits for `session`'s turn to write its record or status (one write at a time per
    /// session on this agent); the turn lasts while the guard lives.
    pub(crate) async fn write_turn(&self, session: &SessionKey) -> OwnedMutexGuard<()> {
        let lock = self
            .writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(session.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// How many sessions have a holder here.
    #[cfg(test)]
    fn holding(&self) -> usize {
        self.by_session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> SessionKey {
        ("default".to_owned(), name.to_owned())
    }

    #[test]
    fn a_newer_connection_of_a_session_ends_the_older_one() {
        let holders = Holders::default();
        let old = Connection::new(CancellationToken::new());
        let new = Connection::new(CancellationToken::new());
        assert_eq!(holders.take(key("s"), &old), Taken::Held);
        assert_eq!(holders.take(key("s"), &new), Taken::TookOver);
        assert!(old.end.is_cancelled() && old.is_superseded());
        assert!(!new.end.is_cancelled() && !new.is_superseded());
        // The old one ending afterwards does not forget the new holder.
        holders.leave(&key("s"), &old);
        assert_eq!(holders.holding(), 1);
        holders.leave(&key("s"), &new);
        assert_eq!(holders.holding(), 0);
    }

    #[test]
    fn the_same_connection_holding_again_and_other_sessions_end_nothing() {
        let holders = Holders::default();
        let a = Connection::new(CancellationToken::new());
        let b = Connection::new(CancellationToken::new());
        assert_eq!(holders.take(key("s"), &a), Taken::Held);
        // More listeners on the same connection are the same hold.
        assert_eq!(holders.take(key("s"), &a), Taken::Held);
        assert_eq!(holders.take(key("t"), &b), Taken::Held);
        assert!(!a.end.is_cancelled() && !b.end.is_cancelled());
        assert_eq!(holders.holding(), 2);
    }

    #[tokio::test]
    async fn a_write_under_way_when_a_newer_connection_takes_over_lands_before_its_first() {
        let holders = Arc::new(Holders::default());
        let old = Connection::new(CancellationToken::new());
        let new = Connection::new(CancellationToken::new());
        assert_eq!(holders.take(key("s"), &old), Taken::Held);
        // The old connection's write is under way (it checked it was not superseded).
        let old_turn = holders.write_turn(&key("s")).await;
        assert!(!old.is_superseded());
        assert_eq!(holders.take(key("s"), &new), Taken::TookOver);
        // The new connection's first write waits for it…
        let waiting = tokio::spawn({
            let holders = holders.clone();
            async move {
                let _turn = holders.write_turn(&key("s")).await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(old_turn);
        waiting.await.unwrap();
        // …and a later write of the old one sees it was superseded.
        let _turn = holders.write_turn(&key("s")).await;
        assert!(old.is_superseded());
    }

    #[tokio::test]
    async fn a_sessions_write_lock_goes_with_its_last_holder_or_last_writer() {
        let holders = Holders::default();
        let a = Connection::new(CancellationToken::new());
        assert_eq!(holders.take(key("s"), &a), Taken::Held);
        drop(holders.write_turn(&key("s")).await);
        holders.leave(&key("s"), &a);
        assert!(holders.writes.lock().unwrap().is_empty());
        // The release's write after the holder left: pruned once its turn is over.
        let turn = holders.write_turn(&key("s")).await;
        holders.prune(&key("s"));
        assert_eq!(holders.writes.lock().unwrap().len(), 1, "still in use");
        drop(turn);
        holders.prune(&key("s"));
        assert!(holders.writes.lock().unwrap().is_empty());
    }

    #[test]
    fn an_older_connection_holding_late_is_the_one_ended() {
        // Accepted in this order; the newer one holds first (the older one's first status
        // write was slow, or it asked for its listeners late).
        let holders = Holders::default();
        let old = Connection::new(CancellationToken::new());
        let new = Connection::new(CancellationToken::new());
        assert_eq!(holders.take(key("s"), &new), Taken::Held);
        assert_eq!(holders.take(key("s"), &old), Taken::Superseded);
        assert!(old.end.is_cancelled() && old.is_superseded());
        assert!(!new.end.is_cancelled() && !new.is_superseded());
        // The superseded one ending does not forget the holder.
        holders.leave(&key("s"), &old);
        assert_eq!(holders.holding(), 1);
    }
}

//! Which SSH connection holds each session's listeners. ktctl reconnects when its
//! connection goes silent (a black-holed path, issue 16) and asks for its reverse tunnels
//! again on the new one; from this side the old connection can look alive for a minute
//! more (until the server's keepalive gives up). Both would then renew the session's status
//! with different listeners, each undoing the other's, so the Service's traffic would flip
//! between a live and a dead listener. The newer connection of a session wins: the older
//! one is ended when the newer one holds. Only the session's key can log in, so only the
//! session's own ktctl can take it over.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;

/// A session, `(namespace, name)`.
pub(crate) type SessionKey = (String, String);

/// One SSH connection's identity and the token that ends it.
#[derive(Clone, Debug)]
pub(crate) struct Connection {
    id: u64,
    end: CancellationToken,
}

impl Connection {
    /// A new connection, told apart from every other of this process, ended by `end`.
    pub(crate) fn new(end: CancellationToken) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            end,
        }
    }
}

/// The connection holding each session's listeners on this agent.
#[derive(Debug, Default)]
pub(crate) struct Holders {
    by_session: Mutex<HashMap<SessionKey, Connection>>,
}

impl Holders {
    /// Records `connection` as holding `session` and ends the connection that held it
    /// before, if another did; `true` when one was ended.
    pub(crate) fn take(&self, session: SessionKey, connection: &Connection) -> bool {
        let previous = self
            .by_session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, connection.clone());
        match previous {
            Some(previous) if previous.id != connection.id => {
                previous.end.cancel();
                true
            }
            _ => false,
        }
    }

    /// Forgets `session`'s holder if it is still `connection` (it ended); a newer holder
    /// stays.
    pub(crate) fn leave(&self, session: &SessionKey, connection: &Connection) {
        let mut by_session = self.by_session.lock().unwrap_or_else(|e| e.into_inner());
        if by_session
            .get(session)
            .is_some_and(|c| c.id == connection.id)
        {
            by_session.remove(session);
        }
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
        assert!(!holders.take(key("s"), &old));
        assert!(holders.take(key("s"), &new));
        assert!(old.end.is_cancelled());
        assert!(!new.end.is_cancelled());
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
        assert!(!holders.take(key("s"), &a));
        // More listeners on the same connection are the same hold.
        assert!(!holders.take(key("s"), &a));
        assert!(!holders.take(key("t"), &b));
        assert!(!a.end.is_cancelled() && !b.end.is_cancelled());
        assert_eq!(holders.holding(), 2);
    }
}

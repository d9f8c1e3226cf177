//! Waiting for a condition instead of sleeping for a guess: [`eventually`] polls a check
//! until it passes, and fails the test with what the check last saw when patience runs out.
//!
//! Patience is `KT_TEST_PATIENCE_MS` milliseconds (default 60 000) for each wait. A check
//! that passes returns at once, so a generous patience costs nothing when things work; raise
//! it on a slow machine, lower it to make a hanging test fail sooner.

use std::{
    fmt::{Debug, Display},
    time::{Duration, Instant},
};

/// How often a check is repeated.
const POLL: Duration = Duration::from_millis(100);

/// How long one wait may take: `KT_TEST_PATIENCE_MS`, else 60 s.
pub fn patience() -> Duration {
    std::env::var("KT_TEST_PATIENCE_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_millis)
}

/// What a check answers: `true`, `Some(value)` or `Ok(value)` when it passes; otherwise what
/// it saw, for the failure message.
pub trait Outcome {
    /// What a passing check gives back.
    type Value;
    /// What a failing check saw.
    type Seen: Debug;
    fn passed(self) -> Result<Self::Value, Self::Seen>;
}

impl Outcome for bool {
    type Value = ();
    type Seen = &'static str;
    fn passed(self) -> Result<(), &'static str> {
        if self { Ok(()) } else { Err("false") }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    type Seen = &'static str;
    fn passed(self) -> Result<T, &'static str> {
        self.ok_or("None")
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    type Value = T;
    type Seen = E;
    fn passed(self) -> Result<T, E> {
        self
    }
}

/// Repeats `check` every 100 ms until it passes or `within` has passed: what it gave, or
/// what it saw last. For waits whose bound is part of what a test asserts (a lease runs
/// out within so long); others use [`eventually`].
pub async fn poll_within<C: Outcome>(
    within: Duration,
    mut check: impl AsyncFnMut() -> C,
) -> Result<C::Value, C::Seen> {
    let deadline = Instant::now() + within;
    loop {
        match check().await.passed() {
            Err(_) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            outcome => return outcome,
        }
    }
}

/// Repeats `check` every 100 ms until it passes, and returns what it gave. Panics with `what`
/// and what the check last saw once [`patience`] has passed.
pub async fn eventually<C: Outcome>(what: impl Display, check: impl AsyncFnMut() -> C) -> C::Value {
    poll_within(patience(), check)
        .await
        .unwrap_or_else(|seen| panic!("{what}: not within {:?}; last seen: {seen:?}", patience()))
}

/// [`eventually`] for a test without a runtime: sleeps the thread between checks.
pub fn eventually_blocking<C: Outcome>(
    what: impl Display,
    mut check: impl FnMut() -> C,
) -> C::Value {
    let deadline = Instant::now() + patience();
    loop {
        match check().passed() {
            Ok(value) => return value,
            Err(seen) if Instant::now() >= deadline => {
                panic!("{what}: not within {:?}; last seen: {seen:?}", patience())
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// `Ok(value)` when `pass`, else `Err(value)`: turns a condition on what a check saw into
/// the check's answer, keeping what it saw for the failure message.
pub fn seen<T: Debug>(value: T, pass: impl FnOnce(&T) -> bool) -> Result<T, T> {
    if pass(&value) { Ok(value) } else { Err(value) }
}

/// Waits until `$cond` holds (evaluated again every 100 ms, up to [`patience`]); on time out
/// panics with the message, formatted as by `assert!`.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($message:tt)+) => {
        $crate::harness::eventually::eventually(
            format_args!($($message)+).to_string(),
            async || $cond,
        )
        .await
    };
}

/// A shell command that waits until the shell condition `condition` succeeds (tried every
/// 100 ms), for scripts that run inside a pod; fails (exit 124) after [`patience`].
pub fn shell_until(condition: &str) -> String {
    format!(
        "timeout {} sh -c 'until {condition}; do sleep 0.1; done'",
        patience().as_secs().max(1)
    )
}

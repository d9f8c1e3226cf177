//! Progress of a long wait (a pod starting, a Deployment scaling back, agents programming a
//! redirect): what is awaited and for how long. On a terminal it is one status line,
//! redrawn every second in place and wiped when the wait ends or a log line is printed (the
//! log formatter asks [`clear_status_line`] first); when stderr is not a terminal — a CI
//! log, a file — it is a plain log line every six seconds, as ktctl v0.3.7 prints
//! (`Waiting for pod X ...`), with the elapsed time added.

use std::{
    io::{IsTerminal as _, Write as _},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// Whether a status line is on the terminal now (it must be wiped before other output).
static STATUS_SHOWN: AtomicBool = AtomicBool::new(false);

/// How often the terminal's status line is redrawn.
const TERMINAL_EVERY: Duration = Duration::from_secs(1);
/// How often a plain progress line is logged (v0.3.7's pod poll).
const PLAIN_EVERY: Duration = Duration::from_secs(6);

/// One wait's progress; the status line goes when it is dropped.
pub struct Progress {
    what: String,
    started: Instant,
    terminal: bool,
    period: Duration,
    /// When the progress is shown next.
    next: Instant,
}

impl Progress {
    /// A wait for `what` ("pod web-kt-exchange-abcde to run") starting now.
    pub fn start(what: impl Into<String>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let period = if terminal {
            TERMINAL_EVERY
        } else {
            PLAIN_EVERY
        };
        let started = Instant::now();
        Self {
            what: what.into(),
            started,
            terminal,
            period,
            next: started + period,
        }
    }

    /// Resolves when the progress is due to be shown again (for a `select!` beside the
    /// wait itself).
    pub async fn tick(&mut self) {
        tokio::time::sleep_until(self.next).await;
        self.next += self.period;
    }

    /// Shows the progress with `detail` if it is due (for a polling loop).
    pub fn show_if_due(&mut self, detail: &str) {
        let now = Instant::now();
        if now >= self.next {
            self.show(detail);
            self.next = now + self.period;
        }
    }

    /// Shows the progress with `detail` (the latest state seen: "ContainerCreating", "1 of
    /// 2 nodes"; empty for none).
    pub fn show(&self, detail: &str) {
        let line = line(&self.what, detail, self.started.elapsed());
        if self.terminal {
            let mut err = std::io::stderr().lock();
            // `\r` + erase line: the status line is rewritten in place.
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            STATUS_SHOWN.store(true, Ordering::Relaxed);
        } else {
            tracing::info!("{line}");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        clear_status_line();
    }
}

/// Wipes the status line if one is shown; the log formatter calls this before each line.
pub fn clear_status_line() {
    if STATUS_SHOWN.swap(false, Ordering::Relaxed) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

/// `Waiting for <what> ... (<detail>, <elapsed>)`, the elapsed time in whole seconds, or
/// minutes and seconds from one minute on.
pub fn line(what: &str, detail: &str, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    let elapsed = if seconds < 60 {
        format!("{seconds}s")
    } else {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    };
    if detail.is_empty() {
        format!("Waiting for {what} ... ({elapsed})")
    } else {
        format!("Waiting for {what} ... ({detail}, {elapsed})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_what_is_awaited_the_latest_state_and_for_how_long() {
        assert_eq!(
            line(
                "pod web-kt-exchange-abcde to run",
                "ContainerCreating",
                Duration::from_millis(12_900)
            ),
            "Waiting for pod web-kt-exchange-abcde to run ... (ContainerCreating, 12s)"
        );
        assert_eq!(
            line("deployment web to recover", "", Duration::from_secs(125)),
            "Waiting for deployment web to recover ... (2m05s)"
        );
    }
}

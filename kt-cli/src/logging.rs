//! Console logging in ktctl's (zerolog console) format on stderr:
//! `3:04PM INF message key=value`. `--debug` lowers the level to debug; `KT_LOG` takes an
//! `EnvFilter` directive and wins over both.

use std::fmt;

use tracing::{Event, Level, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    field::Visit,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// Installs the subscriber once; later calls are no-ops.
pub fn init(debug: bool) {
    // hickory-server logs every DNS request at info: the local resolver's traffic is not
    // ktctl's story. Library internals speak at debug only when asked for by KT_LOG.
    let default = if debug {
        "debug,hickory_server=info,hickory_proto=info"
    } else {
        "info,hickory_server=warn"
    };
    let filter = EnvFilter::try_from_env("KT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(KtFormat {
            clock: || chrono::Local::now().format("%-I:%M%p").to_string(),
        })
        .try_init();
}

/// The three-letter level names zerolog prints.
fn level_name(level: Level) -> &'static str {
    match level {
        Level::TRACE => "TRC",
        Level::DEBUG => "DBG",
        Level::INFO => "INF",
        Level::WARN => "WRN",
        Level::ERROR => "ERR",
    }
}

/// One line per event: time, level, message, then fields as `key=value` (quoted when the
/// value has spaces, as zerolog does for `error="..."`).
struct KtFormat {
    clock: fn() -> String,
}

impl<S, N> FormatEvent<S, N> for KtFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        // A wait's status line on the terminal goes first, or the log line would follow it.
        crate::progress::clear_status_line();
        writeln!(
            writer,
            "{}",
            render_line(&(self.clock)(), *event.metadata().level(), &fields)
        )
    }
}

fn render_line(time: &str, level: Level, fields: &Fields) -> String {
    let mut line = format!("{time} {} {}", level_name(level), fields.message);
    for (key, value) in &fields.rest {
        if value.contains(char::is_whitespace) || value.is_empty() {
            line.push_str(&format!(" {key}={value:?}"));
        } else {
            line.push_str(&format!(" {key}={value}"));
        }
    }
    line
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, format!("{value:?}"));
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.rest.push((field.name(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_zerolog_console() {
        let fields = Fields {
            message: "Pod kt-x is ready".into(),
            rest: vec![],
        };
        assert_eq!(
            render_line("3:04PM", Level::INFO, &fields),
            "3:04PM INF Pod kt-x is ready"
        );
        let fields = Fields {
            message: "Failed to update heart beat".into(),
            rest: vec![
                ("error", "connection refused".into()),
                ("pod", "kt-a".into()),
            ],
        };
        assert_eq!(
            render_line("11:59AM", Level::WARN, &fields),
            "11:59AM WRN Failed to update heart beat error=\"connection refused\" pod=kt-a"
        );
    }

    #[test]
    fn level_names() {
        let names: Vec<_> = [Level::DEBUG, Level::INFO, Level::WARN, Level::ERROR]
            .into_iter()
            .map(level_name)
            .collect();
        assert_eq!(names, ["DBG", "INF", "WRN", "ERR"]);
    }
}

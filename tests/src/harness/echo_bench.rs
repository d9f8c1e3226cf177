//! The echo measurements the tunnel and exchange benchmarks share. Per path: bulk echo
//! (1 × 64 MiB and 8 × 8 MiB, MiB/s each way) and 2 000 sequential 64-byte round trips
//! (p50 and p99 in µs), taken by kt-tools' `bulk` and `rr` clients wherever the caller
//! runs them. Rounds interleave the paths; a path's result is the median over the rounds.

use std::{process::Command, time::Duration};

use super::{
    results::{self, Results},
    workstation::Background,
};

const MIB: usize = 1 << 20;

/// A path's medians: 1-stream MiB/s, 8-stream MiB/s, p50 µs, p99 µs.
pub type Row = [f64; 4];

/// A path's samples, one per round, in [`Row`]'s columns.
pub type Samples = [Vec<f64>; 4];

/// [`Row`]'s columns as figure names (after the path's name) and units.
const COLUMNS: [(&str, &str); 4] = [
    ("1 stream", "MiB/s"),
    ("8 streams", "MiB/s"),
    ("rr p50", "µs"),
    ("rr p99", "µs"),
];

/// Runs `kt-tools ARGS` where the benchmark measures from: its stdout, or its stderr if it
/// failed.
pub trait EchoClient: Fn(&[&str]) -> Result<String, String> {}
impl<F: Fn(&[&str]) -> Result<String, String>> EchoClient for F {}

/// The [`EchoClient`] that runs `kt_tools()` (a command that runs kt-tools, where the
/// benchmark measures from) with the arguments and waits for it.
pub fn command_client(kt_tools: impl Fn() -> Command) -> impl EchoClient {
    move |args: &[&str]| {
        let out = kt_tools()
            .args(args)
            .output()
            .map_err(|error| format!("kt-tools does not run: {error}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// The median of `v` ([`results::median`]); panics without samples.
pub fn median(v: &[f64]) -> f64 {
    results::median(v).expect("samples")
}

/// Waits until `addr` echoes through `client`; panics with the logs of the processes the
/// path runs through (`behind`) if it does not within 20 s.
pub async fn wait_until_echoes(client: &impl EchoClient, addr: &str, behind: &[&Background]) {
    let mut last_error = String::new();
    for _ in 0..100 {
        match client(&["rr", addr, "1", "8"]) {
            Ok(_) => return,
            Err(error) => last_error = error,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs: Vec<String> = behind.iter().map(|b| b.log()).collect();
    panic!("{addr} does not echo ({last_error}): {logs:?}");
}

/// Measures every `(name, address)` path for `rounds` rounds; the samples per path.
pub fn measure(paths: &[(&str, String)], rounds: usize, client: &impl EchoClient) -> Vec<Samples> {
    let run = |args: &[&str]| client(args).unwrap_or_else(|error| panic!("{args:?}: {error}"));
    let mib_per_s = |streams: &str, bytes: usize, addr: &str| {
        let seconds: f64 = run(&["bulk", addr, streams, &bytes.to_string()])
            .trim()
            .parse()
            .expect("seconds");
        64.0 / seconds
    };
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new(), Vec::new()]; paths.len()];
    for round in 0..rounds {
        for ((name, addr), path) in paths.iter().zip(&mut samples) {
            let one = mib_per_s("1", 64 * MIB, addr);
            let eight = mib_per_s("8", 8 * MIB, addr);
            let out = run(&["rr", addr, "2000", "64"]);
            let mut rr = out
                .split_whitespace()
                .map(|n| n.parse::<f64>().expect("µs"));
            let (p50, p99) = (rr.next().expect("p50"), rr.next().expect("p99"));
            eprintln!(
                "round {round} {name}: {one:.0} / {eight:.0} MiB/s, p50 {p50:.0} µs, p99 {p99:.0} µs"
            );
            for (values, value) in path.iter_mut().zip([one, eight, p50, p99]) {
                values.push(value);
            }
        }
    }
    samples
}

/// Records every path's columns in `results` as figures named `<path>: <column>`; the rows
/// of medians.
pub fn record(results: &mut Results, paths: &[(&str, String)], samples: &[Samples]) -> Vec<Row> {
    paths
        .iter()
        .zip(samples)
        .map(|((name, _), path)| {
            std::array::from_fn(|i| {
                let (column, unit) = COLUMNS[i];
                results
                    .figure(&format!("{name}: {column}"), unit, &path[i])
                    .expect("a figure per path and column")
            })
        })
        .collect()
}

/// Records every column of the path `a` as a ratio to the path `b` (both [`record`]ed).
pub fn record_ratio(results: &mut Results, a: &str, b: &str) {
    for (column, _) in COLUMNS {
        results
            .ratio(&format!("{a}: {column}"), &format!("{b}: {column}"))
            .expect("both paths recorded");
    }
}

/// The table of `rows` under `heading`.
pub fn print_table(heading: &str, paths: &[(&str, String)], rows: &[Row]) {
    println!("{heading} (echo: MiB/s each way; round trip of 64 B)");
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>10}",
        "path", "1 stream", "8 streams", "p50 µs", "p99 µs"
    );
    for ((name, _), row) in paths.iter().zip(rows) {
        println!(
            "{name:<14} {:>10.1} {:>10.1} {:>10.0} {:>10.0}",
            row[0], row[1], row[2], row[3]
        );
    }
}

/// `a vs b`: every column of `a` as a ratio to `b`.
pub fn print_ratio(a_name: &str, a: &Row, b_name: &str, b: &Row) {
    println!(
        "{a_name} vs {b_name}: throughput ×{:.2} (1 stream), ×{:.2} (8 streams); latency p50 ×{:.2}, p99 ×{:.2}",
        a[0] / b[0],
        a[1] / b[1],
        a[2] / b[2],
        a[3] / b[3]
    );
}

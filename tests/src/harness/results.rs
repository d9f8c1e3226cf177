//! Benchmark results a later run can be compared with (issue 17, item 4): every benchmark
//! collects its figures and ratios in one [`Results`] and writes them with
//! [`Results::write`] to `target/kt-bench/<bench>.json`, in the shape tests/README.md
//! documents. The statistics ([`Figure::of`], [`percentile`], [`Results::ratio`],
//! [`Results::to_json`]) are pure; only [`Results::write`] and [`RunMeta::current`] touch
//! the environment.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// What a benchmark's results cannot be made of.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ResultsError {
    #[error("figure {figure:?} has no samples")]
    NoSamples { figure: String },
    #[error("figure {figure:?} has a sample that is not a number")]
    NotANumber { figure: String },
    #[error("figure {figure:?} is recorded twice")]
    Duplicate { figure: String },
    #[error("ratio {figure:?} / {baseline:?}: no figure {missing:?}")]
    UnknownFigure {
        figure: String,
        baseline: String,
        missing: String,
    },
    #[error("ratio {figure:?} / {baseline:?}: the baseline's median is 0")]
    ZeroBaseline { figure: String, baseline: String },
}

/// The median of `samples`: the middle value, or the mean of the two middle values of an
/// even count; `None` without samples.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The `p`-quantile (0.0..=1.0) of `samples` by rank: the value at index
/// ⌊(n − 1) · p⌋ of the sorted samples (no interpolation, so always a measured value);
/// `None` without samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let last = sorted.len().checked_sub(1)?;
    // Truncation is the rank rule.
    let index = ((last as f64) * p.clamp(0.0, 1.0)) as usize;
    sorted.get(index).copied()
}

/// One measured quantity over a run: `rounds` raw samples summarised by their median, min
/// and max, in `unit` (e.g. `"ms"`, `"MiB/s"`, `"KiB"`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figure {
    pub name: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many samples the figure summarises.
    pub rounds: usize,
}

impl Figure {
    /// The figure `name` of `samples`. Errors: no samples, or a NaN among them.
    pub fn of(name: &str, unit: &str, samples: &[f64]) -> Result<Self, ResultsError> {
        if samples.iter().any(|s| s.is_nan()) {
            return Err(ResultsError::NotANumber {
                figure: name.to_owned(),
            });
        }
        let median = median(samples).ok_or_else(|| ResultsError::NoSamples {
            figure: name.to_owned(),
        })?;
        Ok(Self {
            name: name.to_owned(),
            unit: unit.to_owned(),
            median,
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rounds: samples.len(),
        })
    }
}

/// `figure`'s median divided by `baseline`'s median (both figure names of the same run).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratio {
    pub figure: String,
    pub baseline: String,
    pub value: f64,
}

/// `figure`'s median against a target the issue sets (not measured): `ratio` is
/// median / `goal`, in the figure's unit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Goal {
    pub figure: String,
    pub goal: f64,
    pub ratio: f64,
}

/// What a run was: which benchmark, when, on which commit, with which `KT_BENCH_ROUNDS`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunMeta {
    pub bench: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// `git rev-parse HEAD` of the source tree, if git answers.
    pub git_commit: Option<String>,
    /// The environment's `KT_BENCH_ROUNDS`, as given (unset: the benchmark's default).
    pub kt_bench_rounds: Option<String>,
}

impl RunMeta {
    /// This run of `bench`, now.
    pub fn current(bench: &str) -> Self {
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        Self {
            bench: bench.to_owned(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            git_commit: commit,
            kt_bench_rounds: std::env::var("KT_BENCH_ROUNDS").ok(),
        }
    }
}

/// A benchmark's figures, ratios and goals, in the order recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Results {
    bench: String,
    figures: Vec<Figure>,
    ratios: Vec<Ratio>,
    goals: Vec<Goal>,
}

impl Results {
    /// Empty results of the benchmark `bench` (the JSON file's stem).
    pub fn new(bench: &str) -> Self {
        Self {
            bench: bench.to_owned(),
            ..Self::default()
        }
    }

    /// Records the figure `name` of `samples`; its median. Errors: as [`Figure::of`], or a
    /// second figure of that name.
    pub fn figure(&mut self, name: &str, unit: &str, samples: &[f64]) -> Result<f64, ResultsError> {
        if self.get(name).is_some() {
            return Err(ResultsError::Duplicate {
                figure: name.to_owned(),
            });
        }
        let figure = Figure::of(name, unit, samples)?;
        let median = figure.median;
        self.figures.push(figure);
        Ok(median)
    }

    /// The recorded figure `name`.
    pub fn get(&self, name: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.name == name)
    }

    /// Records and returns the ratio of `figure`'s median to `baseline`'s. Errors: either
    /// figure not recorded, or a baseline median of 0.
    pub fn ratio(&mut self, figure: &str, baseline: &str) -> Result<f64, ResultsError> {
        let unknown = |missing: &str| ResultsError::UnknownFigure {
            figure: figure.to_owned(),
            baseline: baseline.to_owned(),
            missing: missing.to_owned(),
        };
        let of = self.get(figure).ok_or_else(|| unknown(figure))?.median;
        let base = self.get(baseline).ok_or_else(|| unknown(baseline))?.median;
        if base == 0.0 {
            return Err(ResultsError::ZeroBaseline {
                figure: figure.to_owned(),
                baseline: baseline.to_owned(),
            });
        }
        let value = of / base;
        self.ratios.push(Ratio {
            figure: figure.to_owned(),
            baseline: baseline.to_owned(),
            value,
        });
        Ok(value)
    }

    /// Records and returns `figure`'s median / `goal`. Errors: the figure not recorded, or a
    /// goal of 0.
    pub fn goal(&mut self, figure: &str, goal: f64) -> Result<f64, ResultsError> {
        let of = self
            .get(figure)
            .ok_or_else(|| ResultsError::UnknownFigure {
                figure: figure.to_owned(),
                baseline: "goal".to_owned(),
                missing: figure.to_owned(),
            })?
            .median;
        if goal == 0.0 {
            return Err(ResultsError::ZeroBaseline {
                figure: figure.to_owned(),
                baseline: "goal".to_owned(),
            });
        }
        let ratio = of / goal;
        self.goals.push(Goal {
            figure: figure.to_owned(),
            goal,
            ratio,
        });
        Ok(ratio)
    }

    /// The document tests/README.md describes: `meta`'s fields, then `figures`, `ratios`
    /// and `goals`.
    pub fn to_json(&self, meta: &RunMeta) -> serde_json::Value {
        serde_json::json!({
            "bench": meta.bench,
            "timestamp": meta.timestamp,
            "git_commit": meta.git_commit,
            "kt_bench_rounds": meta.kt_bench_rounds,
            "figures": self.figures,
            "ratios": self.ratios,
            "goals": self.goals,
        })
    }

    /// Where [`Results::write`] puts the benchmark `bench`'s file: the workspace's
    /// `target/kt-bench/<bench>.json` (`CARGO_TARGET_DIR` does not move it: one place to
    /// compare runs in).
    pub fn path_of(bench: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/kt-bench")
            .join(format!("{bench}.json"))
    }

    /// Writes the results, with this run's [`RunMeta`], and says where; a failed write is
    /// reported on stderr, not fatal (the printed tables stand).
    pub fn write(&self) {
        let path = Self::path_of(&self.bench);
        let json = self.to_json(&RunMeta::current(&self.bench));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, serde_json::to_vec_pretty(&json).expect("JSON")));
        match written {
            Ok(()) => println!("results: {}", path.display()),
            Err(error) => eprintln!("results not written to {}: {error}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_percentile_is_a_measured_value_by_rank() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.5), Some(50.0));
        assert_eq!(percentile(&samples, 0.99), Some(99.0));
        assert_eq!(percentile(&samples, 1.0), Some(100.0));
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn a_figure_summarises_its_samples() {
        let figure = Figure::of("up", "ms", &[30.0, 10.0, 20.0, 50.0]).unwrap();
        assert_eq!(
            figure,
            Figure {
                name: "up".into(),
                unit: "ms".into(),
                median: 25.0,
                min: 10.0,
                max: 50.0,
                rounds: 4
            }
        );
        assert_eq!(
            Figure::of("up", "ms", &[]),
            Err(ResultsError::NoSamples {
                figure: "up".into()
            })
        );
        assert!(matches!(
            Figure::of("up", "ms", &[1.0, f64::NAN]),
            Err(ResultsError::NotANumber { .. })
        ));
    }

    #[test]
    fn a_ratio_names_its_baseline_and_divides_the_medians() {
        let mut results = Results::new("b");
        results
            .figure("kt", "MiB/s", &[300.0, 400.0, 500.0])
            .unwrap();
        results.figure("plain", "MiB/s", &[800.0, 700.0]).unwrap();
        let value = results.ratio("kt", "plain").unwrap();
        assert_eq!(value, 400.0 / 750.0);
        assert_eq!(
            results.ratios,
            [Ratio {
                figure: "kt".into(),
                baseline: "plain".into(),
                value
            }]
        );
        assert_eq!(
            results.ratio("kt", "ssh"),
            Err(ResultsError::UnknownFigure {
                figure: "kt".into(),
                baseline: "ssh".into(),
                missing: "ssh".into()
            })
        );
        results.figure("zero", "MiB/s", &[0.0]).unwrap();
        assert!(matches!(
            results.ratio("kt", "zero"),
            Err(ResultsError::ZeroBaseline { .. })
        ));
        assert_eq!(results.ratios.len(), 1, "failed ratios are not recorded");
    }

    #[test]
    fn a_figure_name_is_recorded_once() {
        let mut results = Results::new("b");
        results.figure("up", "ms", &[1.0]).unwrap();
        assert_eq!(
            results.figure("up", "ms", &[2.0]),
            Err(ResultsError::Duplicate {
                figure: "up".into()
            })
        );
        assert_eq!(results.get("up").unwrap().median, 1.0);
    }

    #[test]
    fn the_document_has_the_run_then_figures_ratios_and_goals() {
        let mut results = Results::new("testbed_up");
        results.figure("up", "ms", &[4000.0, 6000.0]).unwrap();
        results.figure("bare", "ms", &[100.0]).unwrap();
        results.ratio("up", "bare").unwrap();
        results.goal("up", 5000.0).unwrap();
        let meta = RunMeta {
            bench: "testbed_up".into(),
            timestamp: "2026-11-30T05:00:00Z".into(),
            git_commit: None,
            kt_bench_rounds: Some("2".into()),
        };
        assert_eq!(
            results.to_json(&meta),
            serde_json::json!({
                "bench": "testbed_up",
                "timestamp": "2026-11-30T05:00:00Z",
                "git_commit": null,
                "kt_bench_rounds": "2",
                "figures": [
                    {"name": "up", "unit": "ms", "median": 5000.0, "min": 4000.0, "max": 6000.0, "rounds": 2},
                    {"name": "bare", "unit": "ms", "median": 100.0, "min": 100.0, "max": 100.0, "rounds": 1}
                ],
                "ratios": [{"figure": "up", "baseline": "bare", "value": 50.0}],
                "goals": [{"figure": "up", "goal": 5000.0, "ratio": 1.0}]
            })
        );
    }
}

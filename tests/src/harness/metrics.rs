//! Reading a Prometheus histogram out of a `/metrics` page (OpenMetrics text, as the agent's
//! `prometheus-client` writes it): the `_count`, `_sum` and cumulative `_bucket{le="…"}`
//! lines of one metric, and quantiles estimated from the buckets. Pure.

/// One histogram as scraped: `buckets` are (upper bound in the metric's unit, cumulative
/// count), ascending, `+Inf` last.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: f64,
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// The histogram `name` (without suffix) in the page `text`; `None` when its `_count`
    /// line is missing.
    pub fn parse(text: &str, name: &str) -> Option<Self> {
        let value = |line: &str| line.rsplit(' ').next()?.parse::<f64>().ok();
        let mut count = None;
        let mut sum = 0.0;
        let mut buckets = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if rest.starts_with("_count ") {
                count = value(line).map(|v| v as u64);
            } else if rest.starts_with("_sum ") {
                sum = value(line).unwrap_or(0.0);
            } else if let Some(labels) = rest.strip_prefix("_bucket{") {
                let Some(le) = labels
                    .split_once("le=\"")
                    .and_then(|(_, after)| after.split_once('"'))
                    .map(|(le, _)| le)
                else {
                    continue;
                };
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                buckets.push((bound, value(line)? as u64));
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Self {
            count: count?,
            sum,
            buckets,
        })
    }

    /// The `q`-quantile (0.0..=1.0) as the upper bound of the first bucket holding it (an
    /// upper estimate, as exact as the buckets; `+Inf` when it lies past the last bound);
    /// `None` for an empty histogram.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (self.count as f64 * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank)
            .map(|(bound, _)| *bound)
    }

    /// What was observed between the scrape `earlier` and this one (both of one running
    /// process, so every count only grew): counts and sums subtracted bucket by bucket.
    /// Buckets `earlier` lacks count from zero.
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let before = |bound: f64| {
            earlier
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |(_, count)| *count)
        };
        Histogram {
            count: self.count.saturating_sub(earlier.count),
            sum: self.sum - earlier.sum,
            buckets: self
                .buckets
                .iter()
                .map(|(bound, count)| (*bound, count.saturating_sub(before(*bound))))
                .collect(),
        }
    }

    /// The mean observation (`sum / count`); `None` for an empty histogram.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# TYPE kt_agent_reconcile_seconds histogram
kt_agent_reconcile_seconds_sum 0.75
kt_agent_reconcile_seconds_count 10
kt_agent_reconcile_seconds_bucket{le=\"0.0001\"} 0
kt_agent_reconcile_seconds_bucket{le=\"0.0002\"} 6
kt_agent_reconcile_seconds_bucket{le=\"0.0004\"} 9
kt_agent_reconcile_seconds_bucket{le=\"+Inf\"} 10
kt_agent_sessions 1
";

    #[test]
    fn parses_count_sum_and_buckets_and_estimates_quantiles() {
        let h = Histogram::parse(PAGE, "kt_agent_reconcile_seconds").expect("present");
        assert_eq!(h.count, 10);
        assert_eq!(h.sum, 0.75);
        assert_eq!(h.buckets.len(), 4);
        assert_eq!(h.quantile(0.5), Some(0.0002));
        assert_eq!(h.quantile(0.9), Some(0.0004));
        assert_eq!(h.quantile(0.99), Some(f64::INFINITY));
        assert_eq!(h.mean(), Some(0.075));
    }

    #[test]
    fn the_difference_of_two_scrapes_is_what_was_observed_between_them() {
        let earlier = Histogram::parse(PAGE, "kt_agent_reconcile_seconds").expect("present");
        let later = Histogram {
            count: 14,
            sum: 1.0,
            buckets: vec![(0.0001, 0), (0.0002, 6), (0.0004, 9), (f64::INFINITY, 14)],
        };
        let between = later.since(&earlier);
        assert_eq!(between.count, 4);
        assert_eq!(between.sum, 0.25);
        assert_eq!(
            between.buckets,
            [(0.0001, 0), (0.0002, 0), (0.0004, 0), (f64::INFINITY, 4)]
        );
        assert_eq!(between.quantile(0.5), Some(f64::INFINITY));
        assert_eq!(later.since(&later).quantile(0.5), None, "nothing between");
    }

    #[test]
    fn a_missing_or_empty_histogram_has_no_quantile() {
        assert_eq!(Histogram::parse(PAGE, "kt_agent_other_seconds"), None);
        let empty = Histogram {
            count: 0,
            sum: 0.0,
            buckets: vec![(f64::INFINITY, 0)],
        };
        assert_eq!(empty.quantile(0.5), None);
        assert_eq!(empty.mean(), None);
    }
}

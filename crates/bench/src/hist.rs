//! Latency histograms. Samples are collected as plain nanosecond values by each task (cheap, no
//! sharing on the hot path) and folded into one HDR histogram at the end.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Up to an hour, at three significant digits.
const HIGHEST_NANOS: u64 = 3_600_000_000_000;

/// Percentiles of one latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// An HDR histogram of nanoseconds.
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Latencies {
        // hdrhistogram fails only for low < 1, high < 2 * low or more than 5 significant digits;
        // these constants are none of those.
        #[allow(clippy::expect_used)]
        let histogram = Histogram::new_with_bounds(1, HIGHEST_NANOS, 3)
            .expect("constant histogram bounds are valid");
        Latencies { histogram }
    }

    pub fn record_nanos(&mut self, nanos: u64) {
        self.histogram.saturating_record(nanos.max(1));
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_nanos(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, nanos: impl IntoIterator<Item = u64>) {
        for value in nanos {
            self.record_nanos(value);
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn summary(&self) -> Summary {
        if self.histogram.is_empty() {
            return Summary::default();
        }
        let us = |nanos: u64| nanos as f64 / 1_000.0;
        Summary {
            count: self.histogram.len(),
            mean_us: self.histogram.mean() / 1_000.0,
            p50_us: us(self.histogram.value_at_quantile(0.50)),
            p90_us: us(self.histogram.value_at_quantile(0.90)),
            p99_us: us(self.histogram.value_at_quantile(0.99)),
            p999_us: us(self.histogram.value_at_quantile(0.999)),
            max_us: us(self.histogram.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut latencies = Latencies::new();
        // 1..=1000 microseconds, once each.
        latencies.extend((1..=1000u64).map(|us| us * 1_000));
        let summary = latencies.summary();
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_us - 500.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.p99_us - 990.0).abs() <= 1.0, "{summary:?}");
        assert!((summary.max_us - 1000.0).abs() <= 1.0, "{summary:?}");
    }

    #[test]
    fn an_empty_histogram_summarises_to_zero() {
        assert_eq!(Latencies::new().summary(), Summary::default());
    }
}

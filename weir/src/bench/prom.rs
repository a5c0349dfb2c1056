//! Reading one Prometheus histogram out of `/metrics` text, taking the difference between two scrapes, and
//! estimating quantiles from it the way PromQL's `histogram_quantile` does (linear within a bucket).

use std::collections::BTreeMap;

use policies::promtext;

/// Cumulative bucket counts of a histogram summed over all label sets, keyed by upper bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `le` upper bound (as ordered bits of the f64, +Inf included) -> cumulative count.
    buckets: BTreeMap<OrdF64, f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct OrdF64(i64);

impl OrdF64 {
    fn new(x: f64) -> Self {
        // Total order on non-NaN floats: flip negatives so integer order matches float order.
        let b = x.to_bits() as i64;
        Self(if b < 0 { b ^ i64::MAX } else { b })
    }
    fn get(self) -> f64 {
        let b = if self.0 < 0 {
            self.0 ^ i64::MAX
        } else {
            self.0
        };
        f64::from_bits(b as u64)
    }
}

impl Histogram {
    /// The `<name>_bucket{..,le="x",..}` samples of Prometheus text ([`promtext`]), summed over label sets per
    /// bound; `None` if the metric is absent.
    pub fn parse(text: &str, name: &str) -> Option<Self> {
        let bucket = format!("{name}_bucket");
        let mut buckets: BTreeMap<OrdF64, f64> = BTreeMap::new();
        for s in promtext::series(text, &bucket) {
            let Some(le) = s.label("le").and_then(|le| match &*le {
                "+Inf" | "Inf" => Some(f64::INFINITY),
                v => v.parse::<f64>().ok(),
            }) else {
                continue;
            };
            if !le.is_nan() && !s.value.is_nan() {
                *buckets.entry(OrdF64::new(le)).or_insert(0.0) += s.value;
            }
        }
        (!buckets.is_empty()).then_some(Self { buckets })
    }

    /// `self - earlier`, bucket by bucket (buckets missing earlier count from zero).
    pub fn delta(&self, earlier: &Self) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    (v - earlier.buckets.get(k).copied().unwrap_or(0.0)).max(0.0),
                )
            })
            .collect();
        Self { buckets }
    }

    /// Bucket-wise sum (histograms from several targets with the same bounds).
    pub fn sum(&self, other: &Self) -> Self {
        let mut buckets = self.buckets.clone();
        for (k, v) in &other.buckets {
            *buckets.entry(*k).or_insert(0.0) += v;
        }
        Self { buckets }
    }

    /// Total observations (the +Inf bucket, else the largest).
    pub fn count(&self) -> f64 {
        self.buckets.values().next_back().copied().unwrap_or(0.0)
    }

    /// Quantile `q` in 0..=1 by linear interpolation inside the bucket; NaN when empty. A quantile in the +Inf
    /// bucket returns the largest finite bound.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total <= 0.0 {
            return f64::NAN;
        }
        let rank = q * total;
        let (mut prev_le, mut prev_count) = (0.0, 0.0);
        for (k, &c) in &self.buckets {
            let le = k.get();
            if c >= rank {
                if le.is_infinite() {
                    return prev_le;
                }
                if c == prev_count {
                    return le;
                }
                return prev_le + (le - prev_le) * (rank - prev_count) / (c - prev_count);
            }
            prev_le = le;
            prev_count = c;
        }
        prev_le
    }
}

/// Sum over every label set of a counter or gauge `name` (exact name, with or without labels); `None` if absent.
pub fn counter(text: &str, name: &str) -> Option<f64> {
    promtext::sum(text, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP weir_sim_token_lateness_seconds Lateness
# TYPE weir_sim_token_lateness_seconds histogram
weir_sim_token_lateness_seconds_bucket{model_name="m",le="0.001"} 5
weir_sim_token_lateness_seconds_bucket{model_name="m",le="0.01"} 10
weir_sim_token_lateness_seconds_bucket{model_name="m",le="0.1"} 10
weir_sim_token_lateness_seconds_bucket{model_name="m",le="+Inf"} 10
weir_sim_token_lateness_seconds_sum{model_name="m"} 0.02
weir_sim_token_lateness_seconds_count{model_name="m"} 10
vllm:num_requests_running{model_name="m"} 0
"#;

    const AFTER: &str = r#"weir_sim_token_lateness_seconds_bucket{model_name="m",le="0.001"} 55
weir_sim_token_lateness_seconds_bucket{model_name="m",le="0.01"} 108
weir_sim_token_lateness_seconds_bucket{model_name="m",le="0.1"} 110
weir_sim_token_lateness_seconds_bucket{model_name="m",le="+Inf"} 110
weir_sim_token_lateness_seconds_bucket{model_name="other",le="0.001"} 0
weir_sim_token_lateness_seconds_bucket{model_name="other",le="0.01"} 0
weir_sim_token_lateness_seconds_bucket{model_name="other",le="0.1"} 0
weir_sim_token_lateness_seconds_bucket{model_name="other",le="+Inf"} 0
"#;

    #[test]
    fn delta_quantiles_interpolate_within_buckets() {
        let name = "weir_sim_token_lateness_seconds";
        let a = Histogram::parse(BEFORE, name).unwrap();
        let b = Histogram::parse(AFTER, name).unwrap();
        let d = b.delta(&a);
        assert_eq!(d.count(), 100.0);
        // 50 observations <= 1 ms: the median is the top of the first bucket.
        assert!((d.quantile(0.5) - 0.001).abs() < 1e-12);
        // Deltas: <=1ms 50, <=10ms 98, <=100ms 100. Rank 99 lies halfway through (0.01, 0.1].
        assert!((d.quantile(0.99) - 0.055).abs() < 1e-12);
        assert!((d.quantile(0.9) - (0.001 + 0.009 * 40.0 / 48.0)).abs() < 1e-12);
    }

    #[test]
    fn absent_metric_is_none_and_empty_delta_is_nan() {
        assert!(Histogram::parse("vllm:x 1\n", "weir_sim_token_lateness_seconds").is_none());
        let a = Histogram::parse(BEFORE, "weir_sim_token_lateness_seconds").unwrap();
        assert!(a.delta(&a).quantile(0.5).is_nan());
    }

    #[test]
    fn counters_sum_over_label_sets_and_ignore_longer_names() {
        let text = "# HELP vllm:prefix_cache_hits_total x\n\
vllm:prefix_cache_hits_total{model_name=\"a\"} 10\n\
vllm:prefix_cache_hits_total{model_name=\"b\"} 5.5\n\
vllm:prefix_cache_hits_total_extra 100\n\
vllm:prefix_cache_queries_total 20\n";
        assert_eq!(counter(text, "vllm:prefix_cache_hits_total"), Some(15.5));
        assert_eq!(counter(text, "vllm:prefix_cache_queries_total"), Some(20.0));
        assert_eq!(counter(text, "vllm:num_requests_running"), None);
    }
}

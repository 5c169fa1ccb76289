//! A fixed-size log-linear latency histogram (nanoseconds): 32 linear sub-buckets per power of two,
//! so a recorded value is off by at most 1/32 (3.1%) of itself; the maximum is kept exactly.
//! Recording is an index computation and an increment — no allocation on the receive path.
//!
//! Worker processes ship their histograms to the parent as their non-empty buckets (serde, see
//! [`HistogramBuckets`]), never as percentiles: percentiles cannot be merged, buckets can.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two, as a power of two.
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Largest power of two kept apart; larger values (over ~18 minutes) share the last buckets.
const MAX_EXPONENT: u32 = 40;
const BUCKETS: usize = ((MAX_EXPONENT - SUB_BUCKET_BITS + 2) as usize) << SUB_BUCKET_BITS;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "HistogramBuckets", try_from = "HistogramBuckets")]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

/// The serialised form of a [`Histogram`]: its layout and its non-empty buckets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistogramBuckets {
    /// Must equal this build's sub-bucket bits (the same binary on both sides).
    pub sub_bucket_bits: u32,
    pub max_exponent: u32,
    /// `(bucket index, count)` of every non-empty bucket.
    pub buckets: Vec<(u32, u64)>,
    /// The largest value recorded, exactly.
    pub max: u64,
}

impl From<Histogram> for HistogramBuckets {
    fn from(histogram: Histogram) -> Self {
        HistogramBuckets {
            sub_bucket_bits: SUB_BUCKET_BITS,
            max_exponent: MAX_EXPONENT,
            buckets: histogram
                .counts
                .iter()
                .enumerate()
                .filter(|(_, count)| **count > 0)
                .map(|(index, count)| (index as u32, *count))
                .collect(),
            max: histogram.max,
        }
    }
}

impl TryFrom<HistogramBuckets> for Histogram {
    type Error = String;

    fn try_from(wire: HistogramBuckets) -> Result<Self, Self::Error> {
        if wire.sub_bucket_bits != SUB_BUCKET_BITS || wire.max_exponent != MAX_EXPONENT {
            return Err(format!(
                "histogram layout {}/{} differs from this build's {SUB_BUCKET_BITS}/{MAX_EXPONENT}",
                wire.sub_bucket_bits, wire.max_exponent
            ));
        }
        let mut histogram = Histogram::new();
        histogram.allocate();
        for (index, count) in wire.buckets {
            let slot = histogram
                .counts
                .get_mut(index as usize)
                .ok_or_else(|| format!("histogram bucket {index} is out of range"))?;
            *slot += count;
            histogram.total += count;
        }
        histogram.max = wire.max;
        Ok(histogram)
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.samples
        )
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS {
        return value as usize;
    }
    let exponent = (63 - value.leading_zeros()).min(MAX_EXPONENT);
    let shift = exponent - SUB_BUCKET_BITS;
    let sub = ((value >> shift) & (SUB_BUCKETS - 1)).min(SUB_BUCKETS - 1);
    let index = (((exponent - SUB_BUCKET_BITS + 1) as usize) << SUB_BUCKET_BITS) + sub as usize;
    index.min(BUCKETS - 1)
}

/// The middle of a bucket's range of values.
fn bucket_value(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB_BUCKETS {
        return index;
    }
    let exponent = (index >> SUB_BUCKET_BITS) + u64::from(SUB_BUCKET_BITS) - 1;
    let sub = index & (SUB_BUCKETS - 1);
    let shift = exponent - u64::from(SUB_BUCKET_BITS);
    let low = (SUB_BUCKETS + sub) << shift;
    low + (1u64 << shift) / 2
}

impl Histogram {
    /// An empty histogram; its buckets (9.5 KB) are allocated on the first value.
    pub fn new() -> Self {
        Histogram {
            counts: Box::new([]),
            total: 0,
            max: 0,
        }
    }

    fn allocate(&mut self) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS].into_boxed_slice();
        }
    }

    pub fn record(&mut self, nanos: u64) {
        self.allocate();
        self.counts[bucket_of(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        self.allocate();
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The largest value recorded, in ns.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), in ns; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bucket_value(index).min(self.max);
            }
        }
        self.max
    }

    pub fn percentiles(&self) -> Percentiles {
        let ms = |ns: u64| ns as f64 / 1e6;
        Percentiles {
            samples: self.total,
            p50_ms: ms(self.quantile(0.50)),
            p90_ms: ms(self.quantile(0.90)),
            p99_ms: ms(self.quantile(0.99)),
            p999_ms: ms(self.quantile(0.999)),
            max_ms: ms(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_bucket_precision() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for (q, exact) in [(0.5, 50_000_000f64), (0.9, 90_000_000.0), (0.99, 99_000_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.035, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.percentiles().max_ms, 100.0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        let mut merged = Histogram::new();
        merged.merge(&h);
        assert_eq!(merged.count(), 100_000);
    }

    /// What the parent does with its workers' histograms: each worker records its own values and
    /// ships its buckets as JSON; the merge of the decoded histograms equals one histogram that
    /// recorded every value.
    #[test]
    fn histograms_merge_across_the_json_wire() {
        let mut everything = Histogram::new();
        let mut workers = [Histogram::new(), Histogram::new(), Histogram::new()];
        for value in 0..30_000u64 {
            let nanos = value * value % 50_000_000 + value;
            everything.record(nanos);
            workers[(value % 3) as usize].record(nanos);
        }
        workers[2].record(7_000_000_000);
        everything.record(7_000_000_000);
        let mut merged = Histogram::new();
        for worker in &workers {
            let line = serde_json::to_string(worker).unwrap();
            let decoded: Histogram = serde_json::from_str(&line).unwrap();
            assert_eq!(&decoded, worker);
            merged.merge(&decoded);
        }
        assert_eq!(merged, everything);
        assert_eq!(merged.count(), 30_001);
        assert_eq!(merged.max(), 7_000_000_000);
        assert_eq!(merged.percentiles(), everything.percentiles());
        // Only the non-empty buckets travel.
        let wire = HistogramBuckets::from(workers[0].clone());
        assert!(wire.buckets.len() < BUCKETS / 2, "{} buckets", wire.buckets.len());
        // A different layout is refused rather than misread.
        let mut foreign = wire;
        foreign.sub_bucket_bits += 1;
        assert!(Histogram::try_from(foreign).is_err());
        let empty: Histogram =
            serde_json::from_str(&serde_json::to_string(&Histogram::new()).unwrap()).unwrap();
        assert!(empty.is_empty());
    }
}

//! A latency histogram with about 1.6 % relative precision over the whole range, in the manner
//! of HdrHistogram: values below 128 ns have a bucket each; above that, every power of two is
//! split into 64 equal buckets. Recording is an index computation and an increment, so the
//! load generator can record every request; histograms of several workers merge by addition.

use std::time::Duration;

/// Buckets below this value are exact (one per nanosecond).
const SUB_BUCKET_BITS: u32 = 7;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
const HALF: u64 = SUB_BUCKETS / 2;
/// Enough buckets for any `u64` value.
const BUCKETS: usize = (SUB_BUCKETS + (64 - SUB_BUCKET_BITS as u64) * HALF) as usize;

/// Request latencies in nanoseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    /// How many values fell into each bucket (see `index`).
    counts: Vec<u64>,
    /// How many values were recorded.
    total: u64,
    /// The largest value recorded, exactly.
    max: u64,
    /// The sum of all values, for the mean.
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

fn index(value: u64) -> usize {
    if value < SUB_BUCKETS {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let top = value >> (exponent - (SUB_BUCKET_BITS - 1));
    (SUB_BUCKETS + u64::from(exponent - SUB_BUCKET_BITS) * HALF + (top - HALF)) as usize
}

/// The smallest value that falls into bucket `i`.
fn lowest(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB_BUCKETS {
        return i;
    }
    let k = i - SUB_BUCKETS;
    let exponent = k / HALF + u64::from(SUB_BUCKET_BITS);
    let top = k % HALF + HALF;
    top << (exponent - u64::from(SUB_BUCKET_BITS - 1))
}

/// The largest value that falls into bucket `i`.
fn highest(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        u64::MAX
    } else {
        lowest(i + 1) - 1
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
            sum: 0,
        }
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_nanos(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn record_nanos(&mut self, nanos: u64) {
        self.counts[index(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
        self.sum += u128::from(nanos);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }

    pub fn mean(&self) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(u64::try_from(self.sum / u128::from(self.total)).unwrap_or(u64::MAX))
    }

    /// The value at quantile `q` (0.0..=1.0): the highest value of the bucket holding the
    /// `ceil(q * count)`-th smallest value, never above the recorded maximum. Zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos(highest(i).min(self.max));
            }
        }
        Duration::from_nanos(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        for value in [
            0,
            1,
            127,
            128,
            129,
            255,
            256,
            1_000,
            123_456,
            1 << 40,
            u64::MAX,
        ] {
            let i = index(value);
            assert!(i < BUCKETS, "{value}");
            assert!(
                lowest(i) <= value && value <= highest(i),
                "{value} in bucket {i}"
            );
        }
        for i in 1..BUCKETS {
            assert_eq!(lowest(i), highest(i - 1) + 1, "bucket {i}");
        }
    }

    #[test]
    fn quantiles_are_within_the_precision() {
        let mut h = Histogram::new();
        for micros in 1..=10_000u64 {
            h.record(Duration::from_micros(micros));
        }
        for (q, expected_micros) in [(0.5, 5_000.0), (0.99, 9_900.0), (0.999, 9_990.0)] {
            let got = h.quantile(q).as_secs_f64() * 1e6;
            assert!(
                (got - expected_micros).abs() / expected_micros < 0.02,
                "q{q}: {got} vs {expected_micros}"
            );
        }
        assert_eq!(h.quantile(1.0), Duration::from_micros(10_000));
        assert_eq!(h.count(), 10_000);
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_max() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record_nanos(10);
        b.record_nanos(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.max(), Duration::from_millis(1));
        assert_eq!(Histogram::new().quantile(0.99), Duration::ZERO);
    }
}

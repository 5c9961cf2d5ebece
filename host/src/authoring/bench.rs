//! `sluice script bench`: a script run again and again on one message under
//! the real engine and limits, each call timed, so an author knows what a
//! script costs per message before it runs in production.

use std::time::{Duration, Instant};

use crate::message::RawMessage;
use crate::script::{ScriptError, ScriptInstance};

/// Calls before timing starts: the instance's memory and caches settle.
const WARM_UP: Duration = Duration::from_millis(200);

/// What a run measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Timed calls.
    pub calls: u64,
    /// Time the timed calls took together.
    pub elapsed: Duration,
    /// The median time of one call.
    pub median: Duration,
    /// The 99th percentile of the time of one call.
    pub p99: Duration,
    /// The slowest call.
    pub max: Duration,
    /// Bytes of the instance's linear memory at the end.
    pub memory_bytes: usize,
}

impl BenchReport {
    /// Calls per second.
    pub fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// Where a run stands, for a progress line.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Timed calls so far.
    pub calls: u64,
    /// Time since timing started.
    pub elapsed: Duration,
}

/// Runs `message` through `instance` for `duration` (after a short warm-up)
/// and times every call; `progress` is told where the run stands about
/// every `every`. A call that fails ends the run with its error: a
/// benchmark of a script that refuses its input measures nothing useful.
pub fn bench(
    instance: &mut ScriptInstance,
    message: &RawMessage,
    duration: Duration,
    every: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<BenchReport, ScriptError> {
    let warm_up = Instant::now();
    while warm_up.elapsed() < WARM_UP {
        instance.parse(message)?;
    }
    let mut times = CallTimes::default();
    let started = Instant::now();
    let mut next_report = every;
    loop {
        let call = Instant::now();
        instance.parse(message)?;
        let now = Instant::now();
        times.record(now - call);
        let elapsed = now - started;
        if elapsed >= next_report {
            progress(Progress {
                calls: times.count,
                elapsed,
            });
            next_report += every;
        }
        if elapsed >= duration {
            return Ok(BenchReport {
                calls: times.count,
                elapsed,
                median: times.quantile(0.5),
                p99: times.quantile(0.99),
                max: times.max,
                memory_bytes: instance.memory_bytes(),
            });
        }
    }
}

/// Call times in buckets: 10 ns wide up to 100 µs, then one bucket per
/// doubling, so memory stays fixed however long the run.
#[derive(Debug)]
struct CallTimes {
    fine: Vec<u64>,
    coarse: [u64; 64],
    count: u64,
    max: Duration,
}

impl CallTimes {
    const STEP_NANOS: u64 = 10;
    const FINE_NANOS: u64 = 100_000;
}

impl Default for CallTimes {
    fn default() -> Self {
        CallTimes {
            fine: vec![0; (Self::FINE_NANOS / Self::STEP_NANOS) as usize],
            coarse: [0; 64],
            count: 0,
            max: Duration::ZERO,
        }
    }
}

impl CallTimes {
    fn record(&mut self, time: Duration) {
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        if nanos < Self::FINE_NANOS {
            self.fine[(nanos / Self::STEP_NANOS) as usize] += 1;
        } else {
            self.coarse[63 - nanos.leading_zeros() as usize] += 1;
        }
        self.count += 1;
        self.max = self.max.max(time);
    }

    /// The time below which `q` of the calls took, at bucket precision
    /// (the bucket's upper bound).
    fn quantile(&self, q: f64) -> Duration {
        let rank = ((self.count as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.fine.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos((i as u64 + 1) * Self::STEP_NANOS);
            }
        }
        for (bit, n) in self.coarse.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = 1u64.checked_shl(bit as u32 + 1).unwrap_or(u64::MAX);
                return Duration::from_nanos(upper).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut times = CallTimes::default();
        for nanos in 1..=1000u64 {
            times.record(Duration::from_nanos(nanos * 100));
        }
        // Median 50 µs, p99 99 µs, each within one 10 ns bucket.
        assert_eq!(times.quantile(0.5), Duration::from_nanos(50_010));
        assert_eq!(times.quantile(0.99), Duration::from_nanos(99_010));
        times.record(Duration::from_millis(3));
        assert_eq!(times.max, Duration::from_millis(3));
        assert_eq!(times.quantile(1.0), Duration::from_millis(3));
    }
}

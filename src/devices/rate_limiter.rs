//! Token-bucket rate limiters with Firecracker's semantics and JSON shape: a bandwidth bucket
//! (bytes) and an operations bucket, each `size` tokens refilled over `refill_time` ms, plus a
//! `one_time_burst` spent first and never refilled. A device that finds too few tokens stops
//! taking requests and resumes when the limiter's timer fires.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::config::{BucketConfig, RateLimit};
use vmm_sys_util::timerfd::TimerFd;

#[derive(Debug)]
struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens now; below zero after a request larger than the whole bucket, which is let
    /// through when the bucket is full and then repaid before anything else passes.
    budget: i128,
    burst: u64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn new(config: &BucketConfig) -> Option<TokenBucket> {
        (config.size > 0 && config.refill_time > 0).then(|| TokenBucket {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * 1_000_000,
            budget: i128::from(config.size),
            burst: config.one_time_burst.unwrap_or(0),
            refilled_at: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_nanos();
        let size = u128::from(self.size);
        let tokens = (elapsed.saturating_mul(size) / self.refill_ns).min(size * 2);
        if tokens == 0 {
            return;
        }
        // Whole tokens only; the remainder of the time counts towards the next one.
        let spent = tokens.saturating_mul(self.refill_ns) / size;
        self.refilled_at += Duration::from_nanos(spent.min(u128::from(u64::MAX)) as u64);
        self.budget = (self.budget + tokens as i128).min(size as i128);
        if self.budget == size as i128 {
            self.refilled_at = now;
        }
    }

    /// How long until `n` tokens may be taken (zero: now).
    fn wait_for(&self, n: u64) -> Duration {
        let needed = i128::from(n.saturating_sub(self.burst).min(self.size));
        if needed <= self.budget {
            return Duration::ZERO;
        }
        let missing = (needed - self.budget) as u128;
        let size = u128::from(self.size);
        Duration::from_nanos((missing.saturating_mul(self.refill_ns)).div_ceil(size).min(u128::from(u64::MAX)) as u64)
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }
}

/// A device's limiter: both buckets, and the timer that wakes the device when tokens are back.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// Requests wait for the timer: nothing passes until it fires.
    waiting: bool,
}

impl RateLimiter {
    pub fn new(limit: &RateLimit) -> std::io::Result<RateLimiter> {
        let timer = TimerFd::new()?;
        // Non-blocking: the worker reads it only when epoll says it fired, but an update may
        // have re-armed it since.
        // SAFETY: fcntl on the descriptor the timer owns.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut limiter = RateLimiter { bandwidth: None, ops: None, timer, waiting: false };
        limiter.update(limit);
        Ok(limiter)
    }

    /// New buckets (full) for those `limit` names, from now on; the others are kept.
    pub fn update(&mut self, limit: &RateLimit) {
        if let Some(bucket) = &limit.bandwidth {
            self.bandwidth = TokenBucket::new(bucket);
        }
        if let Some(bucket) = &limit.ops {
            self.ops = TokenBucket::new(bucket);
        }
        if self.waiting {
            self.waiting = false;
            let _ = self.timer.reset(Duration::from_nanos(1), None); // wake the device now
        }
    }

    /// Takes one operation of `bytes` if both buckets allow it; otherwise takes nothing, arms
    /// the timer and says no until `timer_fired`.
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.waiting {
            return false;
        }
        // Every drive and NIC has a limiter; an unlimited one costs no clock read per request.
        if self.bandwidth.is_none() && self.ops.is_none() {
            return true;
        }
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                wait = wait.max(bucket.wait_for(n));
            }
        }
        if !wait.is_zero() {
            self.waiting = self.timer.reset(wait, None).is_ok();
            return !self.waiting; // without a timer, never stall the device
        }
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.take(n);
            }
        }
        true
    }

    /// The device's worker saw the timer: requests may pass again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.waiting = false;
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(bw: Option<(u64, u64, u64)>, ops: Option<(u64, u64, u64)>) -> RateLimit {
        let bucket = |(size, burst, refill_time)| BucketConfig {
            size,
            one_time_burst: (burst > 0).then_some(burst),
            refill_time,
        };
        RateLimit { bandwidth: bw.map(bucket), ops: ops.map(bucket) }
    }

    #[test]
    fn a_bucket_passes_its_size_then_waits_for_the_refill() {
        let mut limiter = RateLimiter::new(&limit(Some((1000, 0, 100)), None)).unwrap();
        assert!(limiter.consume(600));
        assert!(limiter.consume(400));
        assert!(!limiter.consume(100), "empty");
        assert!(!limiter.consume(1), "waits for the timer, whatever the size");
        std::thread::sleep(Duration::from_millis(20)); // 100 tokens take 10 ms
        limiter.timer_fired();
        assert!(limiter.consume(100));
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_not_refilled() {
        let mut limiter = RateLimiter::new(&limit(Some((100, 1000, 1000)), None)).unwrap();
        assert!(limiter.consume(1000), "the burst");
        assert!(limiter.consume(100), "then the bucket");
        assert!(!limiter.consume(100));
    }

    #[test]
    fn ops_and_bandwidth_both_hold_and_a_refused_request_takes_nothing() {
        let mut limiter = RateLimiter::new(&limit(Some((1000, 0, 60_000)), Some((2, 0, 60_000)))).unwrap();
        assert!(limiter.consume(10));
        assert!(limiter.consume(10));
        assert!(!limiter.consume(10), "out of operations");
        let mut limiter = RateLimiter::new(&limit(Some((1000, 0, 60_000)), Some((2, 0, 60_000)))).unwrap();
        assert!(limiter.consume(1001), "larger than the bucket: passes when the bucket is full");
        let bucket = limiter.bandwidth.as_ref().unwrap();
        assert!(bucket.budget < 0, "and is repaid before anything else passes");
        assert!(!limiter.consume(1));
    }

    #[test]
    fn a_refused_request_leaves_both_buckets_untouched() {
        let mut limiter = RateLimiter::new(&limit(Some((100, 0, 60_000)), Some((10, 0, 60_000)))).unwrap();
        assert!(limiter.consume(90));
        assert!(!limiter.consume(20));
        assert_eq!(limiter.ops.as_ref().unwrap().budget, 9, "the refused request took no operation");
        assert_eq!(limiter.bandwidth.as_ref().unwrap().budget, 10);
    }

    #[test]
    fn update_replaces_the_buckets_it_names_and_wakes_a_waiting_device() {
        let mut limiter = RateLimiter::new(&limit(Some((10, 0, 60_000)), Some((100, 0, 60_000)))).unwrap();
        assert!(limiter.consume(10));
        assert!(!limiter.consume(10));
        limiter.update(&limit(Some((0, 0, 0)), None)); // size 0: no bandwidth limit
        std::thread::sleep(Duration::from_millis(5));
        limiter.timer_fired();
        assert!(limiter.consume(1 << 30), "no bandwidth limit now");
        assert_eq!(limiter.ops.as_ref().unwrap().budget, 98, "the ops bucket was kept");
        limiter.update(&RateLimit::default());
        assert!(limiter.ops.is_some(), "an empty update changes nothing");
        let mut kept = limit(Some((1, 0, 1)), Some((2, 0, 2)));
        kept.merge(&limit(None, Some((3, 0, 3))));
        assert_eq!(kept, limit(Some((1, 0, 1)), Some((3, 0, 3))));
    }

    #[test]
    fn a_timer_read_before_it_fires_does_not_block() {
        let mut limiter = RateLimiter::new(&limit(Some((10, 0, 60_000)), None)).unwrap();
        assert!(limiter.consume(10));
        assert!(!limiter.consume(10)); // armed for about a minute
        limiter.timer_fired(); // returns at once
        assert!(!limiter.consume(10), "still no tokens: armed again");
    }

    #[test]
    fn zero_sized_buckets_limit_nothing_and_the_option_syntax() {
        assert!(!limit(Some((0, 0, 100)), Some((5, 0, 0))).limits());
        let mut parsed = RateLimit::default();
        assert!(parsed.parse_option("bw", "10M/1000").unwrap());
        assert!(parsed.parse_option("ops", "100+50/500").unwrap());
        assert!(!parsed.parse_option("ro", "x").unwrap());
        assert_eq!(parsed, limit(Some((10 << 20, 0, 1000)), Some((100, 50, 500))));
        for bad in ["10M", "x/100", "10/0", "0/100", "1+/100", "99999999999G/1"] {
            assert!(RateLimit::default().parse_option("bw", bad).is_err(), "{bad}");
        }
        let json: RateLimit = serde_json::from_str(r#"{"bandwidth":{"size":1,"refill_time":2}}"#).unwrap();
        assert_eq!(json, limit(Some((1, 0, 2)), None));
        assert!(serde_json::from_str::<RateLimit>(r#"{"bandwidth":{"size":1}}"#).is_err());
        assert!(serde_json::from_str::<RateLimit>(r#"{"bw":{"size":1,"refill_time":2}}"#).is_err());
    }
}

//! Token-bucket limits with Firecracker's semantics and JSON shape: a bandwidth bucket (bytes)
//! and an operations bucket, each `size` tokens refilled over `refill_time` ms, plus a
//! `one_time_burst` spent first and never refilled (`devices::rate_limiter` enforces them).

use serde::{Deserialize, Serialize};

/// One bucket, as Firecracker's `TokenBucket` JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time: u64,
}

/// Firecracker's `RateLimiter` JSON: either bucket may be absent (unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketConfig>,
}

impl RateLimit {
    /// Takes the buckets `update` names and keeps the others, as Firecracker's `PATCH` does (a
    /// bucket of size 0 removes that limit).
    pub fn merge(&mut self, update: &RateLimit) {
        self.bandwidth = update.bandwidth.or(self.bandwidth);
        self.ops = update.ops.or(self.ops);
    }

    /// Whether it limits anything: a bucket of size 0 or refill time 0 is no limit.
    pub fn limits(&self) -> bool {
        [self.bandwidth, self.ops].iter().flatten().any(|b| b.size > 0 && b.refill_time > 0)
    }

    /// The command-line form: `bw=SIZE[+BURST]/MS` and `ops=N[+BURST]/MS` (SIZE may end in K,
    /// M or G), e.g. `bw=10M/1000` for 10 MiB/s.
    pub fn parse_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let bucket = match key {
            "bw" => &mut self.bandwidth,
            "ops" => &mut self.ops,
            _ => return Ok(false),
        };
        let bad = || format!("{key}={value}: use SIZE[+BURST]/MILLISECONDS, e.g. {key}=10M/1000");
        let (amounts, refill) = value.split_once('/').ok_or_else(bad)?;
        let (size, burst) = match amounts.split_once('+') {
            Some((size, burst)) => (size, Some(parse_amount(burst).ok_or_else(bad)?)),
            None => (amounts, None),
        };
        let size = parse_amount(size).ok_or_else(bad)?;
        let refill_time = refill.parse().ok().filter(|ms| *ms > 0).ok_or_else(bad)?;
        if size == 0 {
            return Err(bad());
        }
        *bucket = Some(BucketConfig { size, one_time_burst: burst, refill_time });
        Ok(true)
    }
}

fn parse_amount(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

//! Fault injection, per API: 5xx at a chosen rate, added latency, forced 429 bursts, dropped
//! connections and slow bodies. Random decisions come from a generator seeded from the sandbox
//! seed, so a test run with the same sequence of requests sees the same faults.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What to break for one API. The default breaks nothing. Field names are the JSON names of the
/// admin API (`PUT /_sandbox/faults/{api}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Share of requests (0.0–1.0) answered with a 5xx before they are handled (nothing is
    /// applied).
    pub error_rate: f64,
    /// The status codes to draw from, uniformly; empty means `[500, 502, 503]`.
    pub error_statuses: Vec<u16>,
    /// Whether an injected 5xx comes after the request was handled (its effect applied, as when
    /// the upstream commits and then fails) rather than before (nothing applied).
    pub error_after_handling: bool,
    /// Added to every request before it is handled, in milliseconds.
    pub latency_ms: u64,
    /// A further uniform random 0..=jitter milliseconds.
    pub latency_jitter_ms: u64,
    /// The next N requests get 429 (counts down as they arrive).
    pub burst_429: u32,
    /// `Retry-After` of a forced 429, in seconds; 0 means 1.
    pub burst_retry_after_secs: u64,
    /// Share of requests (0.0–1.0) whose connection is closed with no response.
    pub drop_rate: f64,
    /// Whether a dropped request is handled first (its effect applied, then the response lost,
    /// as when a connection breaks after the upstream committed) rather than dropped on arrival.
    pub drop_after_handling: bool,
    /// Stream every response body in chunks with a pause between them.
    pub slow_body: Option<SlowBody>,
}

/// How a slow body trickles out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SlowBody {
    /// Bytes per chunk (at least 1).
    pub chunk_bytes: usize,
    /// Pause before each chunk after the first, in milliseconds.
    pub chunk_delay_ms: u64,
}

/// How many times each fault fired since the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultCounts {
    pub errors: u64,
    pub delayed: u64,
    pub forced_429: u64,
    pub dropped: u64,
    pub slow_bodies: u64,
}

/// What the gate does with one request, decided on arrival.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plan {
    pub latency_ms: u64,
    /// `Some(retry_after_secs)`: answer 429 at once.
    pub forced_429: Option<u64>,
    pub drop_before: bool,
    pub drop_after: bool,
    /// A 5xx answered before the request is handled.
    pub error_status: Option<u16>,
    /// A 5xx answered after the request was handled.
    pub error_after: Option<u16>,
    pub slow_body: Option<SlowBody>,
}

pub(crate) struct FaultState {
    pub config: FaultConfig,
    pub counts: FaultCounts,
    rng: StdRng,
}

impl FaultState {
    pub(crate) fn new(seed: u64) -> Self {
        FaultState {
            config: FaultConfig::default(),
            counts: FaultCounts::default(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Draws the faults of one request and counts the ones that fire. Draws are made in a fixed
    /// order whatever the outcome, so one fault's rate does not change another's sequence.
    pub(crate) fn plan(&mut self) -> Plan {
        let config = &self.config;
        let jitter = if config.latency_jitter_ms > 0 {
            self.rng.random_range(0..=config.latency_jitter_ms)
        } else {
            0
        };
        let drop_roll: f64 = self.rng.random();
        let error_roll: f64 = self.rng.random();
        let status_pick: usize = self.rng.random_range(0..usize::MAX);

        let latency_ms = config.latency_ms + jitter;
        let forced_429 = if config.burst_429 > 0 {
            self.config.burst_429 -= 1;
            self.counts.forced_429 += 1;
            Some(self.config.burst_retry_after_secs.max(1))
        } else {
            None
        };
        let config = &self.config;
        let dropped = forced_429.is_none() && drop_roll < config.drop_rate;
        let error_status = if forced_429.is_none() && !dropped && error_roll < config.error_rate {
            let statuses: &[u16] = if config.error_statuses.is_empty() {
                &[500, 502, 503]
            } else {
                &config.error_statuses
            };
            Some(statuses[status_pick % statuses.len()])
        } else {
            None
        };
        let plan = Plan {
            latency_ms,
            forced_429,
            drop_before: dropped && !config.drop_after_handling,
            drop_after: dropped && config.drop_after_handling,
            error_status: error_status.filter(|_| !config.error_after_handling),
            error_after: error_status.filter(|_| config.error_after_handling),
            slow_body: config.slow_body.clone(),
        };
        if latency_ms > 0 {
            self.counts.delayed += 1;
        }
        if dropped {
            self.counts.dropped += 1;
        }
        if error_status.is_some() {
            self.counts.errors += 1;
        }
        plan
    }
}

/// Checks the admin input: rates within 0–1, statuses 5xx, chunks non-empty.
pub(crate) fn validate(config: &FaultConfig) -> Result<(), String> {
    for (name, rate) in [
        ("errorRate", config.error_rate),
        ("dropRate", config.drop_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(format!("{name} must be between 0 and 1"));
        }
    }
    if let Some(status) = config
        .error_statuses
        .iter()
        .find(|status| !(500..=599).contains(*status))
    {
        return Err(format!("errorStatuses must be 5xx codes, got {status}"));
    }
    if config
        .slow_body
        .as_ref()
        .is_some_and(|slow| slow.chunk_bytes == 0)
    {
        return Err("slowBody.chunkBytes must be at least 1".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_breaks_nothing() {
        let mut state = FaultState::new(1);
        for _ in 0..100 {
            let plan = state.plan();
            assert_eq!(plan.latency_ms, 0);
            assert!(plan.forced_429.is_none() && plan.error_status.is_none());
            assert!(!plan.drop_before && !plan.drop_after && plan.slow_body.is_none());
        }
        assert_eq!(state.counts, FaultCounts::default());
    }

    #[test]
    fn bursts_count_down_and_rates_are_reproducible() {
        let config = FaultConfig {
            error_rate: 0.3,
            error_statuses: vec![502, 503],
            burst_429: 2,
            ..FaultConfig::default()
        };
        let run = |seed| {
            let mut state = FaultState::new(seed);
            state.config = config.clone();
            (0..1000).map(|_| state.plan()).collect::<Vec<_>>()
        };
        let plans = run(9);
        assert_eq!(plans[0].forced_429, Some(1));
        assert_eq!(plans[1].forced_429, Some(1));
        assert!(plans[2..].iter().all(|plan| plan.forced_429.is_none()));
        let errors = plans
            .iter()
            .filter(|plan| plan.error_status.is_some())
            .count();
        assert!(
            (240..=360).contains(&errors),
            "{errors} errors in 1000 at 30%"
        );
        assert!(
            plans
                .iter()
                .filter_map(|plan| plan.error_status)
                .all(|status| status == 502 || status == 503)
        );
        assert_eq!(run(9), plans);
    }

    #[test]
    fn validation_rejects_nonsense() {
        let bad_rate = FaultConfig {
            error_rate: 1.5,
            ..FaultConfig::default()
        };
        assert!(validate(&bad_rate).is_err());
        let bad_status = FaultConfig {
            error_statuses: vec![404],
            ..FaultConfig::default()
        };
        assert!(validate(&bad_status).is_err());
        assert!(validate(&FaultConfig::default()).is_ok());
    }
}

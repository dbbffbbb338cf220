//! Rates: a pacer for fleet-wide events (escalations), and the `--saturate` ramp's rules.

use std::time::{Duration, Instant};

/// Hands out `rate_per_s` events per second, on whatever tick the caller runs at; at most
/// `max_burst` at once (a stalled caller does not make up for lost time in one burst).
#[derive(Debug, Clone)]
pub struct Pacer {
    rate_per_s: f64,
    credit: f64,
    last: Instant,
    max_burst: f64,
}

impl Pacer {
    pub fn new(rate_per_s: f64, now: Instant, max_burst: u64) -> Self {
        Pacer {
            rate_per_s: if rate_per_s.is_finite() {
                rate_per_s.max(0.0)
            } else {
                0.0
            },
            credit: 0.0,
            last: now,
            max_burst: max_burst.max(1) as f64,
        }
    }

    /// Events due now.
    pub fn due(&mut self, now: Instant) -> u64 {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.credit = (self.credit + dt * self.rate_per_s).min(self.max_burst);
        let n = self.credit.floor();
        self.credit -= n;
        n as u64
    }
}

/// What one step of the ramp measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepFigures {
    pub seconds: f64,
    /// Records the devices produced (telemetry, calibration, config acks) per second.
    pub offered_per_s: f64,
    /// The relay's accepted counter's rise per second.
    pub accepted_per_s: f64,
    /// Records produced but not yet acknowledged, at the step's start and end.
    pub lag_start: u64,
    pub lag_end: u64,
}

/// Why a step counts as not sustained, if it does not.
pub fn fell_behind(f: &StepFigures) -> Option<String> {
    if f.offered_per_s <= 0.0 || f.seconds <= 0.0 {
        return Some("nothing was offered".into());
    }
    if f.accepted_per_s < 0.95 * f.offered_per_s {
        return Some(format!(
            "accepted {:.0}/s < 95 % of offered {:.0}/s",
            f.accepted_per_s, f.offered_per_s
        ));
    }
    let records = f.offered_per_s * f.seconds;
    let growth = f.lag_end.saturating_sub(f.lag_start) as f64;
    if growth > 0.05 * records {
        return Some(format!(
            "unacknowledged records grew by {growth:.0} ({:.1} % of the step's {records:.0})",
            100.0 * growth / records
        ));
    }
    None
}

/// The next step's report interval: half the current one, or `None` below `min`.
pub fn next_interval(current: Duration, min: Duration) -> Option<Duration> {
    let next = current / 2;
    (next >= min && !next.is_zero()).then_some(next)
}

/// CPU use of the three processes in a step, in % of one core.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CpuShares {
    pub relay: Option<f64>,
    pub broker: Option<f64>,
    pub simulator: f64,
}

/// Which resource looked like the limit when ingest fell behind.
pub fn limit(cpu: &CpuShares, cores: usize) -> String {
    let core = |x: f64| x >= 85.0;
    match (cpu.relay, cpu.broker) {
        (Some(r), _) if core(r) => format!(
            "relay CPU: {r:.0} % of one core (near a full core; its MQTT link task files every record)"
        ),
        (_, Some(b)) if core(b) => format!(
            "broker CPU: {b:.0} % of one core (Mosquitto is single-threaded), relay at {}",
            cpu.relay.map_or("n/a".into(), |r| format!("{r:.0} %"))
        ),
        _ => {
            let total = cpu.relay.unwrap_or(0.0) + cpu.broker.unwrap_or(0.0) + cpu.simulator;
            let all = 100.0 * cores as f64;
            if total >= 0.85 * all {
                format!(
                    "the machine: relay + broker + simulator use {total:.0} % of {all:.0} % \
                     (the simulator shares the cores; the relay alone was not at a full core)"
                )
            } else {
                format!(
                    "no CPU near its limit (relay {}, broker {}, simulator {:.0} %): a bounded \
                     queue or window, not compute (e.g. the relay's MQTT request queue: see \
                     'cannot queue a spool ack' in its log; the broker's QoS 1 inflight window, \
                     max_inflight_messages)",
                    cpu.relay.map_or("n/a".into(), |r| format!("{r:.0} %")),
                    cpu.broker.map_or("n/a".into(), |b| format!("{b:.0} %")),
                    cpu.simulator
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_keeps_its_rate_and_caps_bursts() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100.0, t0, 50);
        let mut n = 0;
        for ms in 1..=1000u64 {
            n += p.due(t0 + Duration::from_millis(ms));
        }
        assert!((99..=100).contains(&n), "{n}");
        // Ten seconds without a tick: at most one burst.
        assert_eq!(p.due(t0 + Duration::from_secs(11)), 50);
        assert_eq!(Pacer::new(0.0, t0, 10).due(t0 + Duration::from_secs(5)), 0);
        assert_eq!(
            Pacer::new(f64::NAN, t0, 10).due(t0 + Duration::from_secs(5)),
            0
        );
    }

    #[test]
    fn a_step_falls_behind_on_rate_or_growing_lag() {
        let ok = StepFigures {
            seconds: 20.0,
            offered_per_s: 1000.0,
            accepted_per_s: 990.0,
            lag_start: 100,
            lag_end: 150,
        };
        assert_eq!(fell_behind(&ok), None);
        let slow = StepFigures {
            accepted_per_s: 900.0,
            ..ok
        };
        assert!(fell_behind(&slow).is_some_and(|w| w.contains("95 %")));
        let piling = StepFigures {
            lag_end: 100 + 1500,
            ..ok
        };
        assert!(fell_behind(&piling).is_some_and(|w| w.contains("grew")));
        let draining = StepFigures {
            lag_start: 5000,
            lag_end: 10,
            ..ok
        };
        assert_eq!(fell_behind(&draining), None);
        assert!(fell_behind(&StepFigures::default()).is_some());
    }

    #[test]
    fn the_ramp_halves_the_interval_down_to_a_floor() {
        let min = Duration::from_millis(100);
        assert_eq!(
            next_interval(Duration::from_secs(10), min),
            Some(Duration::from_secs(5))
        );
        assert_eq!(next_interval(Duration::from_millis(150), min), None);
    }

    #[test]
    fn the_limit_names_the_busy_resource() {
        let relay = CpuShares {
            relay: Some(97.0),
            broker: Some(40.0),
            simulator: 50.0,
        };
        assert!(limit(&relay, 2).starts_with("relay CPU"));
        let broker = CpuShares {
            relay: Some(60.0),
            broker: Some(99.0),
            simulator: 30.0,
        };
        assert!(limit(&broker, 2).starts_with("broker CPU"));
        let machine = CpuShares {
            relay: Some(70.0),
            broker: Some(60.0),
            simulator: 60.0,
        };
        assert!(limit(&machine, 2).starts_with("the machine"));
        let idle = CpuShares {
            relay: Some(20.0),
            broker: None,
            simulator: 10.0,
        };
        assert!(limit(&idle, 2).starts_with("no CPU"));
    }
}

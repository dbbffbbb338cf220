//! The telemetry report an agent publishes on `tierd/v1/{device}/telemetry` every interval.
//!
//! One report describes one window. It carries both the window's own figures and the running
//! totals since the agent started, so a receiver that misses a report still has exact totals,
//! and the sequence number (contiguous per `boot_id`) proves whether anything was missed.
//!
//! Extending the report: postcard is not self-describing, so new fields cannot be appended
//! silently. A later schema (the tuner's calibration statistics, say) gets its own message kind
//! in [`crate::codec`] and the receiver accepts both kinds during a rollout.

use serde::{Deserialize, Serialize};

use crate::cascade::{Signal, Tier};

/// Requests by how they were answered (plus the two ways a request is refused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierCounts {
    pub edge: u64,
    pub cloud: u64,
    pub edge_fallback: u64,
    /// Rejected as malformed (HTTP 400/404); never reached the model.
    pub bad_request: u64,
    /// Refused with 503 because the queue was full.
    pub overloaded: u64,
    /// Background audit calls to the cloud (not requests: each duplicates a local answer).
    pub audits: u64,
}

impl TierCounts {
    /// Requests answered by `tier`.
    pub fn get(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Edge => self.edge,
            Tier::Cloud => self.cloud,
            Tier::EdgeFallback => self.edge_fallback,
        }
    }

    /// `(tier, requests)` for every tier, in [`Tier::ALL`] order (metrics and API labels).
    pub fn by_tier(&self) -> [(Tier, u64); 3] {
        Tier::ALL.map(|t| (t, self.get(t)))
    }

    /// Field-wise sum (windows into totals).
    pub fn plus(self, o: TierCounts) -> TierCounts {
        TierCounts {
            edge: self.edge + o.edge,
            cloud: self.cloud + o.cloud,
            edge_fallback: self.edge_fallback + o.edge_fallback,
            bad_request: self.bad_request + o.bad_request,
            overloaded: self.overloaded + o.overloaded,
            audits: self.audits + o.audits,
        }
    }

    /// What was added since `earlier` (totals into a window); never negative.
    pub fn since(self, earlier: TierCounts) -> TierCounts {
        TierCounts {
            edge: self.edge.saturating_sub(earlier.edge),
            cloud: self.cloud.saturating_sub(earlier.cloud),
            edge_fallback: self.edge_fallback.saturating_sub(earlier.edge_fallback),
            bad_request: self.bad_request.saturating_sub(earlier.bad_request),
            overloaded: self.overloaded.saturating_sub(earlier.overloaded),
            audits: self.audits.saturating_sub(earlier.audits),
        }
    }

    /// Requests that got an inference answer.
    pub fn answered(&self) -> u64 {
        self.edge + self.cloud + self.edge_fallback
    }

    /// Escalations attempted: answered by the cloud, or fallen back to the edge.
    pub fn escalated(&self) -> u64 {
        self.cloud + self.edge_fallback
    }
}

/// Why escalated requests fell back to the edge answer, counted per window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackCounts {
    pub timeout: u64,
    pub disconnected: u64,
    pub overload: u64,
    pub relay_error: u64,
    pub publish_failed: u64,
}

impl FallbackCounts {
    /// What was added since `earlier`; never negative.
    pub fn since(self, earlier: FallbackCounts) -> FallbackCounts {
        FallbackCounts {
            timeout: self.timeout.saturating_sub(earlier.timeout),
            disconnected: self.disconnected.saturating_sub(earlier.disconnected),
            overload: self.overload.saturating_sub(earlier.overload),
            relay_error: self.relay_error.saturating_sub(earlier.relay_error),
            publish_failed: self.publish_failed.saturating_sub(earlier.publish_failed),
        }
    }
}

/// Which latency a [`LatencySummary`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LatencySeries {
    /// Whole request, answered at the edge.
    PathEdge,
    /// Whole request, answered by the cloud.
    PathCloud,
    /// Whole request, escalated but answered by the edge after all.
    PathEdgeFallback,
    /// Waiting for a worker slot.
    StageQueue,
    /// The local model's forward pass.
    StageForward,
    /// Publish to reply (or timeout) of an escalation.
    StageEscalation,
}

impl LatencySeries {
    pub const ALL: [LatencySeries; 6] = [
        LatencySeries::PathEdge,
        LatencySeries::PathCloud,
        LatencySeries::PathEdgeFallback,
        LatencySeries::StageQueue,
        LatencySeries::StageForward,
        LatencySeries::StageEscalation,
    ];

    /// `("path", "edge")` or `("stage", "forward")`: the Prometheus label this series gets.
    pub fn label(self) -> (&'static str, &'static str) {
        match self {
            LatencySeries::PathEdge => ("path", "edge"),
            LatencySeries::PathCloud => ("path", "cloud"),
            LatencySeries::PathEdgeFallback => ("path", "edge_fallback"),
            LatencySeries::StageQueue => ("stage", "queue"),
            LatencySeries::StageForward => ("stage", "forward"),
            LatencySeries::StageEscalation => ("stage", "escalation"),
        }
    }
}

/// Quantiles of one series over one window, in microseconds. `count == 0` means no samples
/// (and all quantiles 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub series: LatencySeries,
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Energy over the window and since start. Joules are never silently zero: when no meter
/// works, `meter` says so and the figures are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnergyReport {
    /// e.g. `rapl:package-0`, `hwmon:1-0040`, `estimate:rpi4`, or `none` (with the reason in
    /// `error`).
    pub meter: String,
    /// True when the figures are modelled (CPU time × board coefficient), not measured.
    pub estimated: bool,
    /// Whole-meter joules in this window (board, package or process, depending on the meter).
    pub window_joules: Option<f64>,
    /// Joules attributed to this agent's work in the window (see the attribution docs).
    pub attributed_joules: Option<f64>,
    /// Attributed compute joules per answered request in the window.
    pub joules_per_inference: Option<f64>,
    /// Modelled radio joules per escalation (bytes and messages × the link's coefficients).
    pub radio_joules_per_escalation: Option<f64>,
    /// Radio joules modelled for the window.
    pub radio_joules: f64,
    /// Attributed joules since the agent started (compute + radio).
    pub total_joules: f64,
    /// MQTT payload bytes sent / received for escalations in the window.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Last meter error, if the meter failed during the window.
    pub error: Option<String>,
}

/// What the board was doing, from `sysinfo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceContext {
    /// Whole-machine CPU use, 0–100 %.
    pub cpu_percent: f32,
    /// CPU seconds this agent used in the window (all threads).
    pub agent_cpu_seconds: f64,
    pub cpu_cores: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Hottest sensor, °C, and its label; `None` where the board exposes none.
    pub temperature_c: Option<f32>,
    pub temperature_sensor: Option<String>,
}

/// The agent's store-and-forward spool at report time (see `edge_agent::spool`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolCounts {
    /// Records waiting for the relay's acknowledgement.
    pub pending: u64,
    /// Records dropped, oldest first, because the spool reached its size cap (since the spool
    /// was created; survives restarts).
    pub dropped: u64,
    /// Frames found corrupt or torn at recovery and skipped (since the spool was created).
    pub corrupt: u64,
}

/// Agent → relay on `tierd/v1/{device}/telemetry`, QoS 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryReport {
    pub device_id: String,
    /// Start time of this agent process (Unix ms); sequence numbers restart with it.
    pub boot_id: u64,
    /// 1 for the first report after start, then +1 per report.
    pub seq: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// `name@version` of the edge model.
    pub model: String,
    pub threshold: f32,
    pub signal: Signal,
    pub window: TierCounts,
    pub totals: TierCounts,
    pub fallbacks: FallbackCounts,
    /// One entry per [`LatencySeries`], in [`LatencySeries::ALL`] order.
    pub latency: Vec<LatencySummary>,
    pub energy: EnergyReport,
    pub device: DeviceContext,
    pub spool: SpoolCounts,
    /// Version of the remote config document in force (0: none applied, `agent.toml` only).
    pub config_version: u64,
}

/// Per-confidence-bin evidence of one window, for the relay's tuner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinCounts {
    /// Requests escalated, and of those, how many got a cloud answer and agreed with the edge.
    pub escalated: u64,
    pub escalated_labelled: u64,
    pub escalated_agree: u64,
    /// Requests answered locally, and of those, how many were audited and agreed.
    pub local: u64,
    pub audited: u64,
    pub audited_agree: u64,
}

impl BinCounts {
    /// Field-wise sum (windows into a sliding total).
    pub fn plus(self, o: BinCounts) -> BinCounts {
        BinCounts {
            escalated: self.escalated + o.escalated,
            escalated_labelled: self.escalated_labelled + o.escalated_labelled,
            escalated_agree: self.escalated_agree + o.escalated_agree,
            local: self.local + o.local,
            audited: self.audited + o.audited,
            audited_agree: self.audited_agree + o.audited_agree,
        }
    }

    /// Field-wise difference, never negative (a window leaving a sliding total).
    pub fn minus(self, o: BinCounts) -> BinCounts {
        BinCounts {
            escalated: self.escalated.saturating_sub(o.escalated),
            escalated_labelled: self.escalated_labelled.saturating_sub(o.escalated_labelled),
            escalated_agree: self.escalated_agree.saturating_sub(o.escalated_agree),
            local: self.local.saturating_sub(o.local),
            audited: self.audited.saturating_sub(o.audited),
            audited_agree: self.audited_agree.saturating_sub(o.audited_agree),
        }
    }
}

/// Agent → relay on `tierd/v1/{device}/telemetry`, QoS 1, published with each
/// [`TelemetryReport`] (same `boot_id` and `seq`). A separate message kind, so the report's
/// schema did not change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationReport {
    pub device_id: String,
    pub boot_id: u64,
    pub seq: u64,
    /// What the bins are bins of.
    pub signal: Signal,
    /// Lower edges of the bins; bin `i` is `[edges[i], edges[i + 1])`, the last ends at 1.
    pub edges: Vec<f32>,
    pub bins: Vec<BinCounts>,
    /// Fraction of local answers audited, as configured.
    pub audit_rate: f32,
    /// Every threshold under which a request of this window was decided (at most
    /// [`MAX_THRESHOLDS_IN_FORCE`]; an agent that saw more sends every bin edge, which is
    /// exact but pools less). The relay's bound pools bins between these cuts.
    pub thresholds: Vec<f32>,
    /// `name@version` of the edge model whose evidence this is: an agent serving several
    /// models sends one report per model per window (same `boot_id` and `seq`).
    pub model: String,
    /// The model's threshold in force when the window was taken.
    pub threshold: f32,
}

/// Thresholds a calibration window lists at most.
pub const MAX_THRESHOLDS_IN_FORCE: usize = 8;

impl TelemetryReport {
    /// Share of answered requests in the window that were escalated; `None` for an idle window.
    pub fn escalation_rate(&self) -> Option<f64> {
        let answered = self.window.answered();
        (answered > 0).then(|| self.window.escalated() as f64 / answered as f64)
    }

    pub fn latency(&self, series: LatencySeries) -> Option<&LatencySummary> {
        self.latency.iter().find(|l| l.series == series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode, EscalationReply, WireError};

    fn report() -> TelemetryReport {
        TelemetryReport {
            device_id: "pi-field-07".into(),
            boot_id: 1_795_000_000_000,
            seq: 12,
            window_start_ms: 1_795_000_030_000,
            window_end_ms: 1_795_000_060_000,
            model: "digits-edge@1.0.0".into(),
            threshold: 0.9,
            signal: Signal::MaxProb,
            window: TierCounts {
                edge: 700,
                cloud: 280,
                edge_fallback: 20,
                bad_request: 3,
                overloaded: 0,
                audits: 14,
            },
            totals: TierCounts {
                edge: 7000,
                cloud: 2800,
                edge_fallback: 200,
                bad_request: 30,
                overloaded: 1,
                audits: 140,
            },
            fallbacks: FallbackCounts {
                timeout: 20,
                ..Default::default()
            },
            latency: LatencySeries::ALL
                .iter()
                .map(|&series| LatencySummary {
                    series,
                    count: 1000,
                    p50_us: 130,
                    p95_us: 400,
                    p99_us: 900,
                    max_us: 250_000,
                })
                .collect(),
            energy: EnergyReport {
                meter: "estimate:rpi4".into(),
                estimated: true,
                window_joules: Some(3.5),
                attributed_joules: Some(3.5),
                joules_per_inference: Some(0.0035),
                radio_joules_per_escalation: Some(0.0002),
                radio_joules: 0.06,
                total_joules: 42.0,
                bytes_out: 40_000,
                bytes_in: 20_000,
                error: None,
            },
            device: DeviceContext {
                cpu_percent: 12.5,
                agent_cpu_seconds: 0.8,
                cpu_cores: 4,
                memory_used_bytes: 900 << 20,
                memory_total_bytes: 4 << 30,
                temperature_c: Some(61.3),
                temperature_sensor: Some("cpu_thermal".into()),
            },
            spool: SpoolCounts {
                pending: 2,
                dropped: 0,
                corrupt: 1,
            },
            config_version: 1_795_000_000_123,
        }
    }

    #[test]
    fn round_trips_compactly() {
        let r = report();
        let bytes = encode(&r).expect("encode");
        assert_eq!(decode::<TelemetryReport>(&bytes), Ok(r));
        // Radio bytes cost energy: a full report stays far below one TCP segment.
        assert!(bytes.len() < 400, "report is {} bytes", bytes.len());
    }

    #[test]
    fn is_not_mistaken_for_another_message() {
        let bytes = encode(&report()).expect("encode");
        assert!(matches!(
            decode::<EscalationReply>(&bytes),
            Err(WireError::Kind { got: 3, .. })
        ));
    }

    #[test]
    fn series_discriminants_follow_all() {
        // The agent indexes its histogram array by discriminant.
        for (i, s) in LatencySeries::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }

    #[test]
    fn derived_rates() {
        let r = report();
        assert_eq!(r.escalation_rate(), Some(0.3));
        assert_eq!(r.totals.answered(), 10_000);
        assert_eq!(
            r.latency(LatencySeries::StageForward).map(|l| l.count),
            Some(1000)
        );
        let idle = TelemetryReport {
            window: TierCounts::default(),
            ..r
        };
        assert_eq!(idle.escalation_rate(), None);
    }
}

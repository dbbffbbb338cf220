//! The figures of a run, as a table for people and as JSON (the same numbers).

use std::fmt::Write as _;

use serde::Serialize;

use crate::pace::CpuShares;

#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub mode: String,
    pub devices: usize,
    pub connections: usize,
    pub report_interval_s: f64,
    pub calibration_every: u64,
    pub requests_per_report: u64,
    pub escalations_per_s: f64,
    pub escalation_timeout_ms: u64,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub relay_spawned: bool,
    pub cores: usize,
}

/// Escalations in the measured window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Escalations {
    pub sent: u64,
    pub answered: u64,
    pub per_s: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub timed_out: u64,
    pub overloaded: u64,
    pub errors: u64,
    pub late_replies: u64,
    /// Not sent: the in-flight bound was reached or the connection was down.
    pub skipped: u64,
}

/// What the measured window cost and carried.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    pub seconds: f64,
    /// Records the devices produced per second (telemetry + calibration + config acks).
    pub records_offered_per_s: f64,
    pub telemetry_offered_per_s: f64,
    pub calibration_offered_per_s: f64,
    pub config_acks_offered_per_s: f64,
    /// MQTT publishes of records per second, resends included.
    pub records_published_per_s: f64,
    /// The relay's accepted counter's rise per second.
    pub ingested_per_s_relay: f64,
    /// Relay CPU time per record it accepted, in microseconds.
    pub relay_cpu_us_per_record: Option<f64>,
    /// Records the devices saw acknowledged per second.
    pub ingested_per_s_acks: f64,
    pub escalations: Escalations,
    pub cpu: CpuShares,
    pub relay_rss_bytes: Option<u64>,
    pub relay_rss_peak_bytes: Option<u64>,
    /// The relay's RSS before the fleet connected.
    pub relay_rss_idle_bytes: Option<u64>,
    pub store_bytes: Option<u64>,
    pub store_growth_bytes: Option<i64>,
    /// Records produced but not acknowledged when the window closed.
    pub ack_lag_end: u64,
    pub resends: u64,
    pub queue_full: u64,
}

/// One step of `--saturate`.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub report_interval_s: f64,
    pub seconds: f64,
    pub telemetry_offered_per_s: f64,
    pub records_offered_per_s: f64,
    pub accepted_per_s: f64,
    pub acked_per_s: f64,
    pub lag_start: u64,
    pub lag_end: u64,
    pub cpu: CpuShares,
    pub escalation_p99_ms: Option<f64>,
    pub escalation_timeouts: u64,
    /// Why the step was not sustained, if it was not.
    pub fell_behind: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Saturation {
    pub steps: Vec<Step>,
    /// The highest offered rates ingested in full.
    pub sustained_records_per_s: Option<f64>,
    pub sustained_telemetry_per_s: Option<f64>,
    pub limit: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub window: Window,
    pub saturation: Option<Saturation>,
    /// The relay's rejection counter's rise over the whole run (must be 0).
    pub rejected: u64,
    /// Records accepted by the relay over the whole run.
    pub accepted_total: u64,
    pub records_generated: u64,
    pub telemetry_generated: u64,
    pub calibration_generated: u64,
    pub config_documents_received: u64,
    pub config_acks_sent: u64,
    pub spool_dropped: u64,
    /// Records never acknowledged after the drain at the end.
    pub ack_lag_after_drain: u64,
    pub relay_devices: Option<u64>,
    pub metrics_scrape_ms: f64,
    pub metrics_scrape_bytes: usize,
    pub reconnects: u64,
    /// A spawned relay's log: warnings and errors by message, most frequent first.
    pub relay_log_warnings: Vec<(String, u64)>,
    pub passed: bool,
    pub failures: Vec<String>,
    pub warnings: Vec<String>,
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.1}{unit}"))
}

fn mib(b: Option<u64>) -> String {
    b.map_or("n/a".into(), |b| {
        format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
    })
}

fn per_device(b: Option<u64>, n: usize) -> String {
    b.map_or("n/a".into(), |b| {
        format!("{:.0} B", b as f64 / n.max(1) as f64)
    })
}

impl Report {
    pub fn table(&self) -> String {
        let s = &self.setup;
        let w = &self.window;
        let e = &w.escalations;
        let n = s.devices;
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row(
            "setup",
            format!(
                "{} devices over {} MQTT connections, report every {:.3} s, calibration every {}, {} requests/report, {:.1} escalations/s ({} ms timeout); {} s warmup + {:.0} s measured",
                n, s.connections, s.report_interval_s, s.calibration_every, s.requests_per_report,
                s.escalations_per_s, s.escalation_timeout_ms, s.warmup_s, w.seconds
            ),
        );
        row(
            "records offered",
            format!(
                "{:.1}/s (telemetry {:.1}/s, calibration {:.1}/s, config acks {:.2}/s)",
                w.records_offered_per_s,
                w.telemetry_offered_per_s,
                w.calibration_offered_per_s,
                w.config_acks_offered_per_s
            ),
        );
        row(
            "records ingested",
            format!(
                "{:.1}/s by the relay's accepted counter, {:.1}/s by acks received ({:.1}/s published incl. resends)",
                w.ingested_per_s_relay, w.ingested_per_s_acks, w.records_published_per_s
            ),
        );
        row(
            "records rejected",
            format!("{} (relay counter, whole run; must be 0)", self.rejected),
        );
        row(
            "escalations",
            format!(
                "{} sent ({:.1}/s), {} answered, p50 {} p99 {} max {}; {} timed out, {} overloaded, {} errors, {} late, {} not sent",
                e.sent, e.per_s, e.answered, opt(e.p50_ms, " ms"), opt(e.p99_ms, " ms"),
                opt(e.max_ms, " ms"), e.timed_out, e.overloaded, e.errors, e.late_replies, e.skipped
            ),
        );
        row(
            "relay CPU",
            format!(
                "{} of one core ({} per device, {} per record accepted); broker {}, simulator {:.1} %",
                opt(w.cpu.relay, " %"),
                w.cpu
                    .relay
                    .map_or("n/a".into(), |c| format!("{:.4} %", c / n.max(1) as f64)),
                opt(w.relay_cpu_us_per_record, " µs"),
                opt(w.cpu.broker, " %"),
                w.cpu.simulator
            ),
        );
        row(
            "relay RSS",
            format!(
                "{} (peak {}, idle before the fleet {}); {} per device overall, {} per device above idle",
                mib(w.relay_rss_bytes),
                mib(w.relay_rss_peak_bytes),
                mib(w.relay_rss_idle_bytes),
                per_device(w.relay_rss_bytes, n),
                per_device(
                    w.relay_rss_bytes
                        .zip(w.relay_rss_idle_bytes)
                        .map(|(a, b)| a.saturating_sub(b)),
                    n
                ),
            ),
        );
        row(
            "store",
            format!(
                "{} bytes ({} per device), {} bytes growth in the window",
                w.store_bytes.map_or("n/a".into(), |b| b.to_string()),
                per_device(w.store_bytes, n),
                w.store_growth_bytes.map_or("n/a".into(), |b| b.to_string())
            ),
        );
        row(
            "ack lag",
            format!(
                "{} records unacknowledged at the window's end, {} after the drain; {} go-back-N resends, {} full-queue retries, {} dropped at the spool cap",
                w.ack_lag_end, self.ack_lag_after_drain, w.resends, w.queue_full, self.spool_dropped
            ),
        );
        row(
            "config",
            format!(
                "{} documents received, {} acks sent",
                self.config_documents_received, self.config_acks_sent
            ),
        );
        row(
            "relay /metrics",
            format!(
                "{:.1} ms, {} bytes per scrape; {} devices tracked",
                self.metrics_scrape_ms,
                self.metrics_scrape_bytes,
                self.relay_devices.map_or("n/a".into(), |d| d.to_string())
            ),
        );
        for (i, (message, count)) in self.relay_log_warnings.iter().enumerate() {
            row(
                if i == 0 { "relay log" } else { "" },
                format!("{count} x {message}"),
            );
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        if let Some(sat) = &self.saturation {
            let _ = writeln!(out, "\n--saturate steps:");
            let _ =
                writeln!(
                out,
                "{:>10} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7}  verdict",
                "interval s", "telemetry/s", "records/s", "accepted/s", "acked/s", "lag start",
                "lag end", "relay %", "broker %", "sim %", "esc p99", "esc t/o"
            );
            for st in &sat.steps {
                let _ = writeln!(
                    out,
                    "{:>10.4} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>9} {:>9} {:>8} {:>8} {:>8.0} {:>9} {:>7}  {}",
                    st.report_interval_s,
                    st.telemetry_offered_per_s,
                    st.records_offered_per_s,
                    st.accepted_per_s,
                    st.acked_per_s,
                    st.lag_start,
                    st.lag_end,
                    opt(st.cpu.relay, ""),
                    opt(st.cpu.broker, ""),
                    st.cpu.simulator,
                    opt(st.escalation_p99_ms, " ms"),
                    st.escalation_timeouts,
                    st.fell_behind.as_deref().unwrap_or("sustained")
                );
            }
            let _ = writeln!(
                out,
                "last sustained: {} records/s ({} telemetry reports/s)\nlimit: {}",
                opt(sat.sustained_records_per_s, ""),
                opt(sat.sustained_telemetry_per_s, ""),
                sat.limit
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        for f in &self.failures {
            let _ = writeln!(out, "FAILED: {f}");
        }
        let _ = writeln!(
            out,
            "{}",
            if self.passed {
                "result: PASS"
            } else {
                "result: FAIL"
            }
        );
        out
    }
}

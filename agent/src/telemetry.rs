//! Telemetry: what every request costs, recorded on the request path and reported per window.
//!
//! Owns the [`Recorder`] (counters and HDR latency histograms the HTTP handlers write to), the
//! pure assembly of a [`TelemetryReport`] from one window's figures ([`build_report`]), and the
//! reporting loop ([`run`]) that ties in the energy sampler and `sysinfo`, and hands encoded
//! reports to a [`ReportSink`] (MQTT in production; a channel in tests).
//!
//! Window counts are differences of cumulative counters, not counters reset per window, so a
//! request finishing during the swap is counted in exactly one window and the totals always
//! equal the sum of the windows.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tierd_protocol::{
    encode, DeviceContext, EnergyReport, FallbackCounts, LatencySeries, LatencySummary, RecordKind,
    SpoolCounts, TelemetryReport, TierCounts,
};
use tierd_runtime::unix_ms;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::cascade::{FallbackReason, Tier};
use crate::energy::attribution::{attribute, LinkModel, WindowUsage};
use crate::energy::estimate::read_cpu_time;
use crate::energy::sampler::{EnergyState, Sampler};
use crate::escalation::MqttStats;
use crate::policy::Policy;

/// Latencies are recorded in microseconds, 1 µs to 10 min, at 2 significant digits (1 %).
const HIGHEST_US: u64 = 600_000_000;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_US, 2).expect("constant bounds: 1 <= 600e6, 2 sigfigs")
}

#[derive(Debug)]
struct SeriesHistograms {
    /// Since the last report; swapped out by the reporting loop.
    window: Histogram<u64>,
    /// Since start; what `/metrics` exposes as a Prometheus histogram.
    total: Histogram<u64>,
}

/// Cumulative counters by outcome, written by the request path.
#[derive(Debug, Default)]
pub struct Counters {
    pub edge: AtomicU64,
    pub cloud: AtomicU64,
    pub edge_fallback: AtomicU64,
    pub bad_request: AtomicU64,
    pub overloaded: AtomicU64,
    /// Background audits the cloud answered.
    pub audits: AtomicU64,
    fb_timeout: AtomicU64,
    fb_disconnected: AtomicU64,
    fb_overload: AtomicU64,
    fb_relay_error: AtomicU64,
    fb_publish_failed: AtomicU64,
}

impl Counters {
    pub fn count(&self, tier: Tier) {
        let c = match tier {
            Tier::Edge => &self.edge,
            Tier::Cloud => &self.cloud,
            Tier::EdgeFallback => &self.edge_fallback,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_fallback(&self, reason: &FallbackReason) {
        let c = match reason {
            FallbackReason::Timeout => &self.fb_timeout,
            FallbackReason::Disconnected => &self.fb_disconnected,
            FallbackReason::Overload => &self.fb_overload,
            FallbackReason::RelayError(_) => &self.fb_relay_error,
            FallbackReason::PublishFailed => &self.fb_publish_failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tiers(&self) -> TierCounts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TierCounts {
            edge: r(&self.edge),
            cloud: r(&self.cloud),
            edge_fallback: r(&self.edge_fallback),
            bad_request: r(&self.bad_request),
            overloaded: r(&self.overloaded),
            audits: r(&self.audits),
        }
    }

    pub fn fallbacks(&self) -> FallbackCounts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FallbackCounts {
            timeout: r(&self.fb_timeout),
            disconnected: r(&self.fb_disconnected),
            overload: r(&self.fb_overload),
            relay_error: r(&self.fb_relay_error),
            publish_failed: r(&self.fb_publish_failed),
        }
    }
}

/// Where the request path records what it did.
#[derive(Debug)]
pub struct Recorder {
    pub counters: Counters,
    series: [Mutex<SeriesHistograms>; 6],
    /// Whether latencies are recorded at all (`telemetry.enabled`); counters always are.
    latencies: bool,
}

impl Recorder {
    pub fn new(latencies: bool) -> Self {
        Recorder {
            counters: Counters::default(),
            series: std::array::from_fn(|_| {
                Mutex::new(SeriesHistograms {
                    window: new_histogram(),
                    total: new_histogram(),
                })
            }),
            latencies,
        }
    }

    /// `LatencySeries` is a fieldless enum listed in `ALL` order, so its discriminant indexes
    /// the series array.
    fn index(series: LatencySeries) -> usize {
        series as usize
    }

    pub fn record(&self, series: LatencySeries, latency: Duration) {
        if !self.latencies {
            return;
        }
        let us = (latency.as_micros().min(u128::from(HIGHEST_US)) as u64).max(1);
        if let Ok(mut h) = self.series[Self::index(series)].lock() {
            h.window.saturating_record(us);
            h.total.saturating_record(us);
        }
    }

    pub fn record_path(&self, tier: Tier, latency: Duration) {
        let series = match tier {
            Tier::Edge => LatencySeries::PathEdge,
            Tier::Cloud => LatencySeries::PathCloud,
            Tier::EdgeFallback => LatencySeries::PathEdgeFallback,
        };
        self.record(series, latency);
    }

    /// Quantiles of each series since the previous call, which starts a new window.
    pub fn take_window(&self) -> Vec<LatencySummary> {
        LatencySeries::ALL
            .iter()
            .map(|&series| {
                let mut summary = summarize(series, None);
                if let Ok(mut h) = self.series[Self::index(series)].lock() {
                    summary = summarize(series, Some(&h.window));
                    h.window.reset();
                }
                summary
            })
            .collect()
    }

    /// Applies `f` to the since-start histogram of `series` (for `/metrics`).
    pub fn with_total<T>(&self, series: LatencySeries, f: impl FnOnce(&Histogram<u64>) -> T) -> T {
        match self.series[Self::index(series)].lock() {
            Ok(h) => f(&h.total),
            Err(poisoned) => f(&poisoned.into_inner().total),
        }
    }
}

fn summarize(series: LatencySeries, h: Option<&Histogram<u64>>) -> LatencySummary {
    match h {
        Some(h) if !h.is_empty() => LatencySummary {
            series,
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        },
        _ => LatencySummary {
            series,
            count: 0,
            p50_us: 0,
            p95_us: 0,
            p99_us: 0,
            max_us: 0,
        },
    }
}

/// Everything one report is made of, gathered by the loop; [`build_report`] is pure over it.
#[derive(Debug, Clone)]
pub struct WindowInputs {
    pub device_id: String,
    pub boot_id: u64,
    pub seq: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub model: String,
    pub policy: Policy,
    pub totals: TierCounts,
    pub previous_totals: TierCounts,
    pub fallbacks: FallbackCounts,
    pub previous_fallbacks: FallbackCounts,
    pub latency: Vec<LatencySummary>,
    pub energy: EnergyState,
    /// Cumulative meter joules at the previous report.
    pub previous_joules: Option<f64>,
    pub mqtt_messages: u64,
    pub mqtt_bytes_out: u64,
    pub mqtt_bytes_in: u64,
    pub device: DeviceContext,
    pub link: LinkModel,
    /// Attributed joules (compute + radio) up to the previous report.
    pub previous_total_joules: f64,
    pub spool: SpoolCounts,
}

pub fn build_report(w: &WindowInputs) -> TelemetryReport {
    let window = w.totals.since(w.previous_totals);
    let window_joules = match (w.energy.joules, w.previous_joules) {
        (Some(now), Some(before)) => Some((now - before).max(0.0)),
        (Some(now), None) => Some(now.max(0.0)),
        (None, _) => None,
    };
    let a = attribute(
        &WindowUsage {
            window_joules,
            process_only: w.energy.process_only,
            window_seconds: w.window_end_ms.saturating_sub(w.window_start_ms) as f64 / 1000.0,
            agent_cpu_seconds: w.device.agent_cpu_seconds,
            cores: w.device.cpu_cores,
            answered: window.answered(),
            escalations: window.escalated(),
            messages: w.mqtt_messages,
            bytes: w.mqtt_bytes_out + w.mqtt_bytes_in,
        },
        &w.link,
    );
    TelemetryReport {
        device_id: w.device_id.clone(),
        boot_id: w.boot_id,
        seq: w.seq,
        window_start_ms: w.window_start_ms,
        window_end_ms: w.window_end_ms,
        model: w.model.clone(),
        threshold: w.policy.threshold,
        signal: w.policy.signal,
        window,
        totals: w.totals,
        fallbacks: w.fallbacks.since(w.previous_fallbacks),
        latency: w.latency.clone(),
        energy: EnergyReport {
            meter: w.energy.meter.clone(),
            estimated: w.energy.estimated,
            window_joules,
            attributed_joules: a.attributed_joules,
            joules_per_inference: a.joules_per_inference,
            radio_joules_per_escalation: a.radio_joules_per_escalation,
            radio_joules: a.radio_joules,
            total_joules: w.previous_total_joules
                + a.attributed_joules.unwrap_or(0.0)
                + a.radio_joules,
            bytes_out: w.mqtt_bytes_out,
            bytes_in: w.mqtt_bytes_in,
            error: w.energy.error.clone(),
        },
        device: w.device.clone(),
        spool: w.spool,
        config_version: w.policy.config_version,
    }
}

/// Why a record was not accepted by a [`ReportSink`].
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("spool lock poisoned")]
    Poisoned,
    #[error(transparent)]
    Spool(Box<crate::spool::SpoolError>),
}

/// Where encoded reports go: the on-disk spool in production ([`crate::forward::SpoolSink`]).
pub trait ReportSink: Send + Sync + 'static {
    /// Hands one encoded record over without waiting; an error means it was not accepted.
    fn send(&self, kind: RecordKind, payload: Vec<u8>) -> Result<(), SinkError>;
    /// The spool's counters, for the report.
    fn spool(&self) -> SpoolCounts {
        SpoolCounts::default()
    }
}

/// Reads what the board is doing through `sysinfo`.
pub struct DeviceProbe {
    system: Option<sysinfo::System>,
    components: Option<sysinfo::Components>,
    stat_path: PathBuf,
    last_cpu: Option<Duration>,
}

impl DeviceProbe {
    pub fn new(stat_path: PathBuf) -> Self {
        let mut system = sysinfo::System::new().ok();
        if let Some(s) = system.as_mut() {
            // CPU use is a difference between two refreshes; take the first one now.
            s.refresh_cpu_usage();
        }
        let last_cpu = read_cpu_time(&stat_path).ok();
        DeviceProbe {
            system,
            components: sysinfo::Components::new_with_refreshed_list().ok(),
            stat_path,
            last_cpu,
        }
    }

    pub fn sample(&mut self) -> DeviceContext {
        let (cpu_percent, cores, used, total) = match self.system.as_mut() {
            Some(s) => {
                s.refresh_cpu_usage();
                s.refresh_memory();
                (
                    s.global_cpu_usage(),
                    s.cpus().len() as u32,
                    s.used_memory(),
                    s.total_memory(),
                )
            }
            None => (0.0, 0, 0, 0),
        };
        let cores = if cores > 0 {
            cores
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
        };
        let (temperature_c, temperature_sensor) = match self.components.as_mut() {
            Some(c) => {
                c.refresh(false);
                c.iter()
                    .filter_map(|c| c.temperature().map(|t| (t, c.label().to_string())))
                    .filter(|(t, _)| t.is_finite())
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map_or((None, None), |(t, l)| (Some(t), Some(l)))
            }
            None => (None, None),
        };
        let cpu_now = read_cpu_time(&self.stat_path).ok();
        let agent_cpu_seconds = match (cpu_now, self.last_cpu) {
            (Some(now), Some(before)) => now.saturating_sub(before).as_secs_f64(),
            _ => 0.0,
        };
        if cpu_now.is_some() {
            self.last_cpu = cpu_now;
        }
        DeviceContext {
            cpu_percent,
            agent_cpu_seconds,
            cpu_cores: cores,
            memory_used_bytes: used,
            memory_total_bytes: total,
            temperature_c,
            temperature_sensor,
        }
    }
}

/// The latest report, for `/metrics` (energy and device gauges).
pub type LatestReport = Arc<Mutex<Option<TelemetryReport>>>;

/// What the reporting loop needs.
pub struct Reporter {
    pub device_id: String,
    /// Identifies this agent run (Unix ms at start); shared with the status messages.
    pub boot_id: u64,
    /// The primary model serving (a rollout may switch it) and its shadow, if any.
    pub serving: Arc<crate::cascade::Serving<tierd_runtime::Model>>,
    pub recorder: Arc<Recorder>,
    pub evidence: Arc<crate::evidence::Evidence>,
    /// The further models' evidence, each sent as its own calibration report.
    pub further: Vec<ModelEvidence>,
    pub mqtt: Arc<MqttStats>,
    pub policy: watch::Receiver<Policy>,
    pub sampler: Sampler,
    pub device: DeviceProbe,
    pub link: LinkModel,
    pub latest: LatestReport,
}

/// A further model's evidence and the policy it runs under.
pub struct ModelEvidence {
    /// `name@version`.
    pub model: String,
    pub evidence: Arc<crate::evidence::Evidence>,
    pub policy: watch::Receiver<Policy>,
}

/// Takes `evidence`'s window as the calibration report of `model` and spools it.
fn send_calibration(
    sink: &impl ReportSink,
    header: (&str, u64, u64),
    model: &str,
    evidence: &crate::evidence::Evidence,
    policy: &Policy,
) {
    let (device_id, boot_id, seq) = header;
    let window = evidence.take_window();
    let calibration = tierd_protocol::CalibrationReport {
        device_id: device_id.to_string(),
        boot_id,
        seq,
        signal: policy.signal,
        edges: crate::evidence::EDGES.to_vec(),
        bins: window.bins,
        audit_rate: evidence.audit_rate() as f32,
        thresholds: window.thresholds,
        model: model.to_string(),
        threshold: policy.threshold,
    };
    match encode(&calibration) {
        Ok(bytes) => {
            if let Err(e) = sink.send(RecordKind::Calibration, bytes) {
                warn!(seq, %model, error = %e, "calibration report not spooled");
            }
        }
        Err(e) => warn!(seq, %model, error = %e, "calibration report cannot be encoded"),
    }
}

/// Publishes one report per interval until `shutdown` resolves, then a last one covering the
/// final partial window, so a clean stop loses no counts.
pub async fn run(
    mut r: Reporter,
    sink: impl ReportSink,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let boot_id = r.boot_id;
    let mut seq = 0u64;
    let mut start_ms = unix_ms();
    let mut prev_totals = TierCounts::default();
    let mut prev_fallbacks = FallbackCounts::default();
    let mut prev_joules = Some(0.0);
    let mut prev_total_joules = 0.0;
    let mut prev_mqtt = (0u64, 0u64, 0u64);
    let mut interval = r.policy.borrow().telemetry_interval;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Remote config may change the interval; the next window takes the new length.
        let wanted = r.policy.borrow().telemetry_interval;
        if wanted != interval {
            interval = wanted;
            ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let last = tokio::select! {
            _ = ticker.tick() => false,
            _ = &mut shutdown => true,
        };
        seq += 1;
        let end_ms = unix_ms().max(start_ms);
        let totals = r.recorder.counters.tiers();
        let fallbacks = r.recorder.counters.fallbacks();
        let m = &r.mqtt;
        let mqtt_now = (
            m.messages_out.load(Ordering::Relaxed) + m.messages_in.load(Ordering::Relaxed),
            m.bytes_out.load(Ordering::Relaxed),
            m.bytes_in.load(Ordering::Relaxed),
        );
        let energy = r.sampler.state();
        let inputs = WindowInputs {
            device_id: r.device_id.clone(),
            boot_id,
            seq,
            window_start_ms: start_ms,
            window_end_ms: end_ms,
            model: r.serving.model().id(),
            policy: *r.policy.borrow(),
            totals,
            previous_totals: prev_totals,
            fallbacks,
            previous_fallbacks: prev_fallbacks,
            latency: r.recorder.take_window(),
            previous_joules: prev_joules,
            energy: energy.clone(),
            mqtt_messages: mqtt_now.0.saturating_sub(prev_mqtt.0),
            mqtt_bytes_out: mqtt_now.1.saturating_sub(prev_mqtt.1),
            mqtt_bytes_in: mqtt_now.2.saturating_sub(prev_mqtt.2),
            device: r.device.sample(),
            link: r.link,
            previous_total_joules: prev_total_joules,
            spool: sink.spool(),
        };
        let report = build_report(&inputs);
        match encode(&report) {
            Ok(bytes) => {
                debug!(seq, bytes = bytes.len(), "telemetry report");
                if let Err(e) = sink.send(RecordKind::Telemetry, bytes) {
                    warn!(seq, error = %e, "telemetry report not spooled");
                }
            }
            Err(e) => warn!(seq, error = %e, "telemetry report cannot be encoded"),
        }
        let header = (r.device_id.as_str(), boot_id, seq);
        send_calibration(&sink, header, &inputs.model, &r.evidence, &inputs.policy);
        if let Some(shadow) = crate::rollout::shadow_report(&r.serving, header) {
            match encode(&shadow) {
                Ok(bytes) => {
                    if let Err(e) = sink.send(RecordKind::Shadow, bytes) {
                        warn!(seq, error = %e, "shadow report not spooled");
                    }
                }
                Err(e) => warn!(seq, error = %e, "shadow report cannot be encoded"),
            }
        }
        for m in &r.further {
            let policy = *m.policy.borrow();
            send_calibration(&sink, header, &m.model, &m.evidence, &policy);
        }
        prev_totals = totals;
        prev_fallbacks = fallbacks;
        if energy.joules.is_some() {
            prev_joules = energy.joules;
        }
        prev_total_joules = report.energy.total_joules;
        prev_mqtt = mqtt_now;
        start_ms = end_ms;
        if let Ok(mut latest) = r.latest.lock() {
            *latest = Some(report);
        }
        if last {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::Signal;
    use crate::energy::attribution::Link;

    fn inputs() -> WindowInputs {
        WindowInputs {
            device_id: "edge-01".into(),
            boot_id: 1000,
            seq: 3,
            window_start_ms: 10_000,
            window_end_ms: 40_000,
            model: "digits-edge@1.0.0".into(),
            policy: Policy {
                threshold: 0.9,
                signal: Signal::Margin,
                escalation_timeout: Duration::from_millis(250),
                audit_rate: 0.02,
                telemetry_interval: Duration::from_secs(30),
                config_version: 0,
            },
            totals: TierCounts {
                edge: 170,
                cloud: 25,
                edge_fallback: 5,
                bad_request: 1,
                overloaded: 0,
                audits: 0,
            },
            previous_totals: TierCounts {
                edge: 100,
                cloud: 0,
                edge_fallback: 0,
                bad_request: 1,
                overloaded: 0,
                audits: 0,
            },
            fallbacks: FallbackCounts {
                timeout: 5,
                ..Default::default()
            },
            previous_fallbacks: FallbackCounts::default(),
            latency: Vec::new(),
            energy: EnergyState {
                meter: "estimate:generic-x86".into(),
                estimated: true,
                process_only: true,
                joules: Some(12.0),
                watts: None,
                error: None,
            },
            previous_joules: Some(2.0),
            mqtt_messages: 55,
            mqtt_bytes_out: 30 * 96,
            mqtt_bytes_in: 25 * 70,
            device: DeviceContext {
                cpu_percent: 5.0,
                agent_cpu_seconds: 1.25,
                cpu_cores: 2,
                memory_used_bytes: 1,
                memory_total_bytes: 2,
                temperature_c: None,
                temperature_sensor: None,
            },
            link: Link::Wifi.model(),
            previous_total_joules: 7.0,
            spool: SpoolCounts::default(),
        }
    }

    #[test]
    fn report_windows_are_differences_of_totals() {
        let r = build_report(&inputs());
        assert_eq!(r.window.edge, 70);
        assert_eq!(r.window.cloud, 25);
        assert_eq!(r.window.edge_fallback, 5);
        assert_eq!(r.window.bad_request, 0);
        assert_eq!(r.totals.answered(), 200);
        assert_eq!(r.fallbacks.timeout, 5);
        assert_eq!(r.signal, Signal::Margin);
        assert_eq!(r.escalation_rate(), Some(0.3));
    }

    #[test]
    fn energy_is_attributed_and_accumulated() {
        let r = build_report(&inputs());
        let e = &r.energy;
        assert!(e.estimated);
        assert_eq!(e.window_joules, Some(10.0));
        assert_eq!(e.attributed_joules, Some(10.0));
        assert_eq!(e.joules_per_inference, Some(0.1));
        let radio = 55.0 * 1.0e-3 + (30.0 * 96.0 + 25.0 * 70.0) * 5.2e-6;
        assert!((e.radio_joules - radio).abs() < 1e-12);
        assert!((e.total_joules - (7.0 + 10.0 + radio)).abs() < 1e-9);
    }

    #[test]
    fn a_broken_meter_reports_none_and_the_reason() {
        let mut w = inputs();
        w.energy.joules = None;
        w.energy.meter = "none".into();
        w.energy.error = Some("no energy meter works on this machine".into());
        let r = build_report(&w);
        assert_eq!(r.energy.window_joules, None);
        assert_eq!(r.energy.joules_per_inference, None);
        assert!(r.energy.error.is_some());
    }

    #[test]
    fn recorder_windows_reset_but_totals_do_not() {
        let rec = Recorder::new(true);
        for us in [100, 200, 300, 400, 10_000] {
            rec.record(LatencySeries::StageForward, Duration::from_micros(us));
        }
        let w = rec.take_window();
        let f = w
            .iter()
            .find(|s| s.series == LatencySeries::StageForward)
            .expect("series");
        assert_eq!(f.count, 5);
        assert!((299..=301).contains(&f.p50_us), "{f:?}");
        assert!((9_950..=10_050).contains(&f.max_us), "{f:?}");
        let again = rec.take_window();
        assert!(again.iter().all(|s| s.count == 0));
        assert_eq!(rec.with_total(LatencySeries::StageForward, |h| h.len()), 5);
        let off = Recorder::new(false);
        off.record(LatencySeries::StageForward, Duration::from_micros(5));
        assert_eq!(off.with_total(LatencySeries::StageForward, |h| h.len()), 0);
    }

    #[test]
    fn device_probe_reads_this_machine() {
        let mut p = DeviceProbe::new(PathBuf::from(crate::energy::estimate::DEFAULT_STAT_PATH));
        let d = p.sample();
        assert!(d.cpu_cores >= 1);
        assert!(d.memory_total_bytes > 0, "{d:?}");
        assert!(d.memory_used_bytes <= d.memory_total_bytes);
    }
}

//! The fleet view: the latest telemetry of every device, and proof of what was missed.
//!
//! Pure state: [`Fleet::ingest`] takes a decoded report and the topic it came on, and decides
//! (new device, next report, gap, duplicate, agent restart, stale). I/O (MQTT in, HTTP out)
//! lives in `lib.rs` and `api.rs`.
//!
//! Every relay replica subscribes to all telemetry without a shared group, so each one holds
//! the whole fleet and any replica can answer `/api/devices`.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use thiserror::Error;
use tierd_protocol::{BinCounts, CalibrationReport, DeviceStatus, TelemetryReport, TierCounts};

use crate::tuner::{self, Bin, Certificate, DeviceCosts, Outcomes, Setup};
use tierd_protocol::LatencySeries;

/// Calibration windows kept per device: the tuner's sliding evidence window.
pub const CALIBRATION_WINDOWS: usize = 20;

/// A device's recent evidence and what the tuner makes of it.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub signal: String,
    pub edges: Vec<f32>,
    pub audit_rate: f32,
    /// Sum of the last windows' counts, per bin.
    pub bins: Vec<BinCounts>,
    /// The tuner's proposal for this device (pushed or not: see `control`).
    pub certificate: Certificate,
    #[serde(skip)]
    windows: VecDeque<Vec<BinCounts>>,
}

fn sum_bins(windows: &VecDeque<Vec<BinCounts>>, n: usize) -> Vec<BinCounts> {
    let mut out = vec![BinCounts::default(); n];
    for w in windows {
        for (o, b) in out.iter_mut().zip(w) {
            *o = o.plus(*b);
        }
    }
    out
}

/// The tuner's bins from the wire's counts.
pub fn tuner_bins(edges: &[f32], counts: &[BinCounts]) -> Vec<Bin> {
    edges
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (&lower, c))| Bin {
            lower,
            upper: edges.get(i + 1).copied().unwrap_or(1.0),
            escalated_requests: c.escalated,
            escalated: Outcomes {
                labelled: c.escalated_labelled,
                agree: c.escalated_agree,
            },
            local_requests: c.local,
            audited: Outcomes {
                labelled: c.audited,
                agree: c.audited_agree,
            },
        })
        .collect()
}

/// Runs the tuner for one device with its measured costs.
fn tune(setup: &Setup, bins: &[Bin], report: &TelemetryReport) -> Certificate {
    tuner::tune(
        bins,
        setup.policy,
        report.threshold,
        &setup.limits,
        &setup.costs,
        &device_costs(report),
    )
}

/// The device's energy and latency figures from its latest telemetry, for `min_cost`.
pub fn device_costs(r: &TelemetryReport) -> DeviceCosts {
    let esc = r
        .latency(LatencySeries::StageEscalation)
        .filter(|l| l.count > 0);
    DeviceCosts {
        local_joules: r.energy.joules_per_inference.unwrap_or(0.0),
        radio_joules: r.energy.radio_joules_per_escalation.unwrap_or(0.0),
        escalation_p50_s: esc.map_or(0.0, |l| l.p50_us as f64 / 1e6),
        escalation_p95_s: esc.map_or(0.0, |l| l.p95_us as f64 / 1e6),
    }
}

/// What the relay made of one spooled record (see [`Fleet::accept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The next record of the stream: process it.
    Deliver,
    /// Already delivered (a resend): acknowledge again, do not process.
    Duplicate,
    /// An earlier record has not arrived yet (lost in transit): not processed; the agent
    /// sends again from the acknowledged point (go-back-N).
    Ahead,
}

/// Spool streams remembered per device (see [`Fleet::accept`]).
pub const STREAMS_PER_DEVICE: usize = 4;

/// Delivery bookkeeping of a device's spool stream, as `/api/devices` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StreamRecord {
    pub stream_id: u64,
    /// The next sequence number expected.
    pub next: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Records the agent will never send (its floor moved past them): dropped at its spool's
    /// cap, or delivered to another relay replica.
    pub skipped: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FleetError {
    #[error("calibration report from {0:?} has malformed bin edges")]
    BadCalibration(String),
    #[error("calibration report from {0:?} before any telemetry report")]
    NoTelemetry(String),
    #[error("report for device {claimed:?} arrived on the topic of {topic:?}")]
    WrongTopic { claimed: String, topic: String },
    #[error("fleet is at its limit of {0} devices; report from {1:?} dropped")]
    Full(usize, String),
    #[error("report from {device:?} has window end {end} before start {start}")]
    BadWindow {
        device: String,
        start: u64,
        end: u64,
    },
}

/// How a report related to the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// First report seen from this device.
    New,
    /// The next sequence number.
    Next,
    /// Sequence numbers were skipped: `missing` reports never arrived.
    Gap { missing: u64 },
    /// Already seen (a QoS 1 redelivery) or older than the latest; ignored.
    Duplicate,
    /// The agent restarted (new boot id); sequence numbers start again.
    Restart,
    /// From an earlier boot than the one already seen; ignored.
    Stale,
    /// A calibration window, added to the device's evidence (see [`Fleet::ingest_calibration`]).
    Calibration,
}

/// Per-device bookkeeping, serialized as-is by `/api/devices`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRecord {
    pub device_id: String,
    /// Relay clock, Unix ms, when the latest report arrived.
    pub last_seen_ms: u64,
    pub boot_id: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Reports received in this boot.
    pub reports: u64,
    /// Reports of this boot that never arrived (seq gaps).
    pub missing_reports: u64,
    pub duplicate_reports: u64,
    pub restarts: u64,
    /// Sum of the windows received this boot; equals `latest.totals` when nothing was missed.
    pub window_sums: TierCounts,
    /// The latest known per-request energy figures (an idle window reports none).
    pub energy_rates: EnergyRates,
    pub latest: TelemetryReport,
    pub calibration: Option<Calibration>,
}

/// Joules per local inference and modelled radio joules per escalation, as last measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EnergyRates {
    pub joules_per_inference: Option<f64>,
    pub radio_joules_per_escalation: Option<f64>,
}

impl EnergyRates {
    fn update(&mut self, r: &TelemetryReport) {
        if r.energy.joules_per_inference.is_some() {
            self.joules_per_inference = r.energy.joules_per_inference;
        }
        if r.energy.radio_joules_per_escalation.is_some() {
            self.radio_joules_per_escalation = r.energy.radio_joules_per_escalation;
        }
    }
}

/// The latest retained status a device (or the broker, as its last will) published.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatusRecord {
    pub online: bool,
    pub boot_id: u64,
    pub reason: String,
    /// Relay clock, Unix ms, when it arrived.
    pub since_ms: u64,
}

#[derive(Debug)]
pub struct Fleet {
    devices: BTreeMap<String, DeviceRecord>,
    statuses: BTreeMap<String, StatusRecord>,
    streams: BTreeMap<String, Vec<StreamRecord>>,
    max_devices: usize,
    setup: Setup,
}

impl Fleet {
    pub fn new(max_devices: usize) -> Self {
        Fleet {
            devices: BTreeMap::new(),
            statuses: BTreeMap::new(),
            streams: BTreeMap::new(),
            max_devices,
            setup: Setup::default(),
        }
    }

    /// Tunes with `setup` instead of the default (99 % agreement, 95 % confidence).
    pub fn with_tuner(mut self, setup: Setup) -> Self {
        self.setup = setup;
        self
    }

    /// Exactly-once delivery of spooled records: decides what to do with record `seq` of
    /// `stream_id` (whose sender will never again send anything below `floor`), and returns
    /// the cumulative acknowledgement to send (`None` before anything was delivered).
    ///
    /// A device normally has one stream (its spool); a new one appears when the spool is
    /// recreated. A few are tracked per device, most recent first, so a stranger publishing
    /// on the device's topic with made-up stream ids cannot reset the real stream's state.
    pub fn accept(
        &mut self,
        device: &str,
        stream_id: u64,
        seq: u64,
        floor: u64,
    ) -> Result<(Delivery, Option<u64>), FleetError> {
        if !self.streams.contains_key(device) && self.streams.len() >= self.max_devices {
            return Err(FleetError::Full(self.max_devices, device.to_string()));
        }
        let list = self.streams.entry(device.to_string()).or_default();
        let s = match list.iter().position(|s| s.stream_id == stream_id) {
            Some(i) => {
                let s = list.remove(i);
                list.insert(0, s);
                &mut list[0]
            }
            None => {
                // First contact: nothing below its floor will come.
                list.insert(
                    0,
                    StreamRecord {
                        stream_id,
                        next: floor,
                        ..Default::default()
                    },
                );
                list.truncate(STREAMS_PER_DEVICE);
                &mut list[0]
            }
        };
        if floor > s.next {
            s.skipped += floor - s.next;
            s.next = floor;
        }
        let delivery = if seq < s.next {
            s.duplicates += 1;
            Delivery::Duplicate
        } else if seq == s.next {
            s.next += 1;
            s.delivered += 1;
            Delivery::Deliver
        } else {
            s.out_of_order += 1;
            Delivery::Ahead
        };
        // Everything below `next` was delivered or will never be sent: safe to release.
        Ok((delivery, s.next.checked_sub(1)))
    }

    /// The device's most recently active spool stream.
    pub fn stream(&self, device: &str) -> Option<&StreamRecord> {
        self.streams.get(device).and_then(|l| l.first())
    }

    pub fn ingest(
        &mut self,
        topic_device: &str,
        report: TelemetryReport,
        now_ms: u64,
    ) -> Result<Ingest, FleetError> {
        if report.device_id != topic_device {
            return Err(FleetError::WrongTopic {
                claimed: report.device_id,
                topic: topic_device.to_string(),
            });
        }
        if report.window_end_ms < report.window_start_ms {
            return Err(FleetError::BadWindow {
                device: report.device_id,
                start: report.window_start_ms,
                end: report.window_end_ms,
            });
        }
        let fresh = |report: TelemetryReport, restarts: u64| DeviceRecord {
            device_id: report.device_id.clone(),
            last_seen_ms: now_ms,
            boot_id: report.boot_id,
            first_seq: report.seq,
            last_seq: report.seq,
            reports: 1,
            // Reports before the first one we saw (the relay started late) count as missing
            // too: the totals still cover them, but their windows were not seen.
            missing_reports: report.seq.saturating_sub(1),
            duplicate_reports: 0,
            restarts,
            window_sums: report.window,
            energy_rates: {
                let mut rates = EnergyRates::default();
                rates.update(&report);
                rates
            },
            latest: report,
            calibration: None,
        };
        let Some(rec) = self.devices.get_mut(topic_device) else {
            if self.devices.len() >= self.max_devices {
                return Err(FleetError::Full(self.max_devices, report.device_id));
            }
            self.devices
                .insert(topic_device.to_string(), fresh(report, 0));
            return Ok(Ingest::New);
        };
        if report.boot_id < rec.boot_id {
            return Ok(Ingest::Stale);
        }
        if report.boot_id > rec.boot_id {
            let restarts = rec.restarts + 1;
            // Evidence is about the model and traffic, not the agent run: keep it.
            let calibration = rec.calibration.take();
            let rates = rec.energy_rates;
            *rec = fresh(report, restarts);
            rec.calibration = calibration;
            rec.energy_rates = EnergyRates {
                joules_per_inference: rec
                    .energy_rates
                    .joules_per_inference
                    .or(rates.joules_per_inference),
                radio_joules_per_escalation: rec
                    .energy_rates
                    .radio_joules_per_escalation
                    .or(rates.radio_joules_per_escalation),
            };
            return Ok(Ingest::Restart);
        }
        if report.seq <= rec.last_seq {
            rec.duplicate_reports += 1;
            return Ok(Ingest::Duplicate);
        }
        let missing = report.seq - rec.last_seq - 1;
        rec.missing_reports += missing;
        rec.last_seq = report.seq;
        rec.reports += 1;
        rec.last_seen_ms = now_ms;
        rec.window_sums = rec.window_sums.plus(report.window);
        rec.energy_rates.update(&report);
        rec.latest = report;
        Ok(if missing == 0 {
            Ingest::Next
        } else {
            Ingest::Gap { missing }
        })
    }

    /// Adds a window of calibration evidence and re-runs the tuner for the device.
    pub fn ingest_calibration(
        &mut self,
        topic_device: &str,
        c: CalibrationReport,
    ) -> Result<(), FleetError> {
        if c.device_id != topic_device {
            return Err(FleetError::WrongTopic {
                claimed: c.device_id,
                topic: topic_device.to_string(),
            });
        }
        if c.edges.len() != c.bins.len()
            || c.edges.is_empty()
            || !c.edges.windows(2).all(|w| w[0] < w[1])
            || c.edges.iter().any(|e| !(0.0..=1.0).contains(e))
        {
            return Err(FleetError::BadCalibration(c.device_id));
        }
        let Some(rec) = self.devices.get_mut(topic_device) else {
            return Err(FleetError::NoTelemetry(c.device_id));
        };
        let setup = self.setup;
        // Disjoint fields: the report is read while the calibration is updated.
        let latest = &rec.latest;
        let cal = rec.calibration.get_or_insert_with(|| Calibration {
            signal: c.signal.clone(),
            edges: c.edges.clone(),
            audit_rate: c.audit_rate,
            bins: Vec::new(),
            certificate: tune(&setup, &[], latest),
            windows: VecDeque::new(),
        });
        // New bins or a new signal make old evidence incomparable: start over.
        if cal.edges != c.edges || cal.signal != c.signal {
            cal.windows.clear();
            cal.edges = c.edges.clone();
            cal.signal = c.signal.clone();
        }
        cal.audit_rate = c.audit_rate;
        cal.windows.push_back(c.bins);
        while cal.windows.len() > CALIBRATION_WINDOWS {
            cal.windows.pop_front();
        }
        cal.bins = sum_bins(&cal.windows, cal.edges.len());
        cal.certificate = tune(&setup, &tuner_bins(&cal.edges, &cal.bins), latest);
        Ok(())
    }

    /// The tuner's latest proposal for a device, with the threshold the device runs.
    pub fn proposal(&self, device_id: &str) -> Option<(Certificate, f32)> {
        let d = self.devices.get(device_id)?;
        let c = d.calibration.as_ref()?;
        Some((c.certificate.clone(), d.latest.threshold))
    }

    /// Records a status message. A status from an older agent run than the one already known
    /// is ignored, so a late last will cannot mark a restarted device offline.
    pub fn set_status(
        &mut self,
        device_id: &str,
        status: DeviceStatus,
        now_ms: u64,
    ) -> Result<(), FleetError> {
        if let Some(known) = self.statuses.get(device_id) {
            if status.boot_id < known.boot_id {
                return Ok(());
            }
        } else if self.statuses.len() >= self.max_devices {
            return Err(FleetError::Full(self.max_devices, device_id.to_string()));
        }
        self.statuses.insert(
            device_id.to_string(),
            StatusRecord {
                online: status.online,
                boot_id: status.boot_id,
                reason: status.reason,
                since_ms: now_ms,
            },
        );
        Ok(())
    }

    pub fn status(&self, device_id: &str) -> Option<&StatusRecord> {
        self.statuses.get(device_id)
    }

    pub fn statuses(&self) -> impl Iterator<Item = (&String, &StatusRecord)> {
        self.statuses.iter()
    }

    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values()
    }

    pub fn get(&self, device_id: &str) -> Option<&DeviceRecord> {
        self.devices.get(device_id)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Sum of the latest totals of every device.
    pub fn totals(&self) -> TierCounts {
        self.devices
            .values()
            .fold(TierCounts::default(), |acc, d| acc.plus(d.latest.totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierd_protocol::{DeviceContext, EnergyReport};

    fn report(device: &str, boot: u64, seq: u64, edge: u64) -> TelemetryReport {
        TelemetryReport {
            device_id: device.into(),
            boot_id: boot,
            seq,
            window_start_ms: seq * 1000,
            window_end_ms: seq * 1000 + 1000,
            model: "m@1".into(),
            threshold: 0.9,
            signal: "max_prob".into(),
            window: TierCounts {
                edge,
                ..Default::default()
            },
            totals: TierCounts {
                edge: edge * seq,
                ..Default::default()
            },
            fallbacks: Default::default(),
            latency: Vec::new(),
            energy: EnergyReport {
                meter: "estimate:generic-x86".into(),
                estimated: true,
                window_joules: Some(1.0),
                attributed_joules: Some(1.0),
                joules_per_inference: None,
                radio_joules_per_escalation: None,
                radio_joules: 0.0,
                total_joules: seq as f64,
                bytes_out: 0,
                bytes_in: 0,
                error: None,
            },
            device: DeviceContext {
                cpu_percent: 1.0,
                agent_cpu_seconds: 0.1,
                cpu_cores: 4,
                memory_used_bytes: 1,
                memory_total_bytes: 2,
                temperature_c: None,
                temperature_sensor: None,
            },
            spool: Default::default(),
            config_version: 0,
        }
    }

    #[test]
    fn contiguous_reports_sum_to_the_totals() {
        let mut f = Fleet::new(10);
        assert_eq!(f.ingest("a", report("a", 1, 1, 5), 0), Ok(Ingest::New));
        for seq in 2..=4 {
            assert_eq!(f.ingest("a", report("a", 1, seq, 5), 0), Ok(Ingest::Next));
        }
        let d = f.get("a").expect("device");
        assert_eq!((d.first_seq, d.last_seq, d.reports), (1, 4, 4));
        assert_eq!(d.missing_reports, 0);
        assert_eq!(d.window_sums, d.latest.totals);
        assert_eq!(f.totals().edge, 20);
    }

    #[test]
    fn gaps_duplicates_restarts_and_stale_reports() {
        let mut f = Fleet::new(10);
        f.ingest("a", report("a", 1, 1, 5), 0).expect("1");
        assert_eq!(
            f.ingest("a", report("a", 1, 4, 5), 0),
            Ok(Ingest::Gap { missing: 2 })
        );
        assert_eq!(
            f.ingest("a", report("a", 1, 4, 5), 0),
            Ok(Ingest::Duplicate)
        );
        assert_eq!(
            f.ingest("a", report("a", 1, 3, 5), 0),
            Ok(Ingest::Duplicate)
        );
        let d = f.get("a").expect("device");
        assert_eq!((d.missing_reports, d.duplicate_reports), (2, 2));
        assert_eq!(f.ingest("a", report("a", 2, 1, 7), 0), Ok(Ingest::Restart));
        assert_eq!(f.get("a").map(|d| (d.restarts, d.last_seq)), Some((1, 1)));
        assert_eq!(f.ingest("a", report("a", 1, 9, 5), 0), Ok(Ingest::Stale));
        assert_eq!(f.get("a").map(|d| d.latest.totals.edge), Some(7));
    }

    #[test]
    fn energy_rates_survive_idle_windows_and_restarts() {
        let mut f = Fleet::new(10);
        let mut busy = report("a", 1, 1, 5);
        busy.energy.joules_per_inference = Some(0.002);
        busy.energy.radio_joules_per_escalation = Some(0.0005);
        f.ingest("a", busy, 0).expect("busy");
        f.ingest("a", report("a", 1, 2, 0), 0).expect("idle");
        f.ingest("a", report("a", 2, 1, 0), 0).expect("restart");
        let rates = f.get("a").map(|d| d.energy_rates).expect("device");
        assert_eq!(rates.joules_per_inference, Some(0.002));
        assert_eq!(rates.radio_joules_per_escalation, Some(0.0005));
    }

    #[test]
    fn a_relay_that_starts_late_counts_earlier_reports_as_missing() {
        let mut f = Fleet::new(10);
        f.ingest("a", report("a", 1, 6, 5), 0).expect("first");
        assert_eq!(f.get("a").map(|d| d.missing_reports), Some(5));
    }

    #[test]
    fn a_late_will_from_an_old_run_does_not_mark_a_restarted_device_offline() {
        let mut f = Fleet::new(10);
        let st = |online, boot_id| DeviceStatus {
            online,
            boot_id,
            reason: if online { "" } else { "connection lost" }.into(),
        };
        f.set_status("a", st(true, 1), 0).expect("online");
        f.set_status("a", st(false, 1), 1).expect("will");
        assert_eq!(f.status("a").map(|s| s.online), Some(false));
        f.set_status("a", st(true, 2), 2).expect("restart");
        f.set_status("a", st(false, 1), 3).expect("late will");
        assert_eq!(
            f.status("a").map(|s| (s.online, s.boot_id)),
            Some((true, 2))
        );
    }

    fn calibration(device: &str, bins: Vec<BinCounts>) -> CalibrationReport {
        let n = bins.len();
        CalibrationReport {
            device_id: device.into(),
            boot_id: 1,
            seq: 1,
            signal: "max_prob".into(),
            edges: (0..n).map(|i| i as f32 / n as f32).collect(),
            bins,
            audit_rate: 0.5,
        }
    }

    #[test]
    fn calibration_windows_slide_and_feed_the_tuner() {
        let mut f = Fleet::new(10);
        assert!(matches!(
            f.ingest_calibration("a", calibration("a", vec![BinCounts::default(); 4])),
            Err(FleetError::NoTelemetry(_))
        ));
        f.ingest("a", report("a", 1, 1, 5), 0).expect("telemetry");
        // Low bins disagree half the time; the top bin always agrees, audited half the time.
        let window = vec![
            BinCounts {
                escalated: 100,
                escalated_labelled: 100,
                escalated_agree: 50,
                ..Default::default()
            },
            BinCounts {
                escalated: 100,
                escalated_labelled: 100,
                escalated_agree: 50,
                ..Default::default()
            },
            BinCounts {
                escalated: 100,
                escalated_labelled: 100,
                escalated_agree: 99,
                ..Default::default()
            },
            BinCounts {
                local: 700,
                audited: 350,
                audited_agree: 350,
                ..Default::default()
            },
        ];
        for _ in 0..(CALIBRATION_WINDOWS + 5) {
            f.ingest_calibration("a", calibration("a", window.clone()))
                .expect("calibration");
        }
        let cal = f
            .get("a")
            .and_then(|d| d.calibration.clone())
            .expect("calibration");
        // Only the last CALIBRATION_WINDOWS windows count.
        assert_eq!(cal.bins[3].local, 700 * CALIBRATION_WINDOWS as u64);
        let c = &cal.certificate;
        assert!(!c.insufficient_evidence, "{c:?}");
        // From 0.5 up the edge disagrees on 1 % of a tenth of the traffic: certified at 0.99.
        // Adding bin 1 (half wrong, a tenth of the traffic) would cost 5 points: not.
        assert_eq!(c.threshold, 0.5, "{c:?}");
        assert!(c.agreement_lower_bound >= 0.99, "{c:?}");
        let mut bad = calibration("a", window);
        bad.edges[1] = 0.9;
        assert!(matches!(
            f.ingest_calibration("a", bad),
            Err(FleetError::BadCalibration(_))
        ));
    }

    #[test]
    fn spooled_records_are_delivered_once_and_in_order() {
        let mut f = Fleet::new(2);
        assert_eq!(f.accept("a", 7, 5, 5), Ok((Delivery::Deliver, Some(5))));
        assert_eq!(f.accept("a", 7, 7, 5), Ok((Delivery::Ahead, Some(5))));
        assert_eq!(f.accept("a", 7, 6, 5), Ok((Delivery::Deliver, Some(6))));
        assert_eq!(f.accept("a", 7, 5, 5), Ok((Delivery::Duplicate, Some(6))));
        assert_eq!(f.accept("a", 7, 7, 5), Ok((Delivery::Deliver, Some(7))));
        // The agent dropped 8..=9 at its cap: its floor says so.
        assert_eq!(f.accept("a", 7, 10, 10), Ok((Delivery::Deliver, Some(10))));
        let s = f.stream("a").copied().expect("stream");
        assert_eq!(
            (s.delivered, s.duplicates, s.out_of_order, s.skipped),
            (4, 1, 1, 2)
        );
        // A recreated spool starts a new stream; a stranger's made-up streams do not reset
        // the real one.
        assert_eq!(f.accept("a", 8, 1, 1), Ok((Delivery::Deliver, Some(1))));
        assert_eq!(f.accept("a", 99, 1_000, 0), Ok((Delivery::Ahead, None)));
        assert_eq!(f.accept("a", 8, 2, 1), Ok((Delivery::Deliver, Some(2))));
        // A relay that starts late takes the floor as the start.
        assert_eq!(f.accept("b", 3, 40, 38), Ok((Delivery::Ahead, Some(37))));
        assert!(matches!(
            f.accept("c", 1, 1, 1),
            Err(FleetError::Full(2, _))
        ));
    }

    #[test]
    fn rejects_forged_topics_bad_windows_and_too_many_devices() {
        let mut f = Fleet::new(1);
        assert!(matches!(
            f.ingest("b", report("a", 1, 1, 5), 0),
            Err(FleetError::WrongTopic { .. })
        ));
        let mut bad = report("a", 1, 1, 5);
        bad.window_end_ms = 0;
        assert!(matches!(
            f.ingest("a", bad, 0),
            Err(FleetError::BadWindow { .. })
        ));
        f.ingest("a", report("a", 1, 1, 5), 0).expect("a");
        assert!(matches!(
            f.ingest("c", report("c", 1, 1, 5), 0),
            Err(FleetError::Full(1, _))
        ));
        assert_eq!(f.len(), 1);
    }
}

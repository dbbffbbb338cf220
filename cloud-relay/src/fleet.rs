//! The fleet view: the latest telemetry of every device, and proof of what was missed.
//!
//! Pure state: [`Fleet::ingest`] takes a decoded report and the topic it came on, and decides
//! (new device, next report, gap, duplicate, agent restart, stale). I/O (MQTT in, HTTP out)
//! lives in `lib.rs` and `api.rs`.
//!
//! Every relay replica subscribes to all telemetry without a shared group, so each one holds
//! the whole fleet and any replica can answer `/api/devices`.

use std::collections::BTreeMap;

use serde::Serialize;
use thiserror::Error;
use tierd_protocol::{DeviceStatus, TelemetryReport, TierCounts};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FleetError {
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
    pub latest: TelemetryReport,
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
    max_devices: usize,
}

fn add(a: TierCounts, b: TierCounts) -> TierCounts {
    TierCounts {
        edge: a.edge + b.edge,
        cloud: a.cloud + b.cloud,
        edge_fallback: a.edge_fallback + b.edge_fallback,
        bad_request: a.bad_request + b.bad_request,
        overloaded: a.overloaded + b.overloaded,
    }
}

impl Fleet {
    pub fn new(max_devices: usize) -> Self {
        Fleet {
            devices: BTreeMap::new(),
            statuses: BTreeMap::new(),
            max_devices,
        }
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
            latest: report,
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
            *rec = fresh(report, restarts);
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
        rec.window_sums = add(rec.window_sums, report.window);
        rec.latest = report;
        Ok(if missing == 0 {
            Ingest::Next
        } else {
            Ingest::Gap { missing }
        })
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
            .fold(TierCounts::default(), |acc, d| add(acc, d.latest.totals))
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

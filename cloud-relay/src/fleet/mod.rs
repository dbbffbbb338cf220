//! The fleet view: the latest telemetry of every device, and proof of what was missed.
//!
//! Pure state, no I/O: [`Fleet`] takes decoded records and the topic they came on, and
//! decides (new device, next report, gap, duplicate, agent restart, stale). The MQTT side
//! feeds it from `intake`; `api` serves it over HTTP.
//!
//! Every relay replica subscribes to all telemetry without a shared group, so each one holds
//! the whole fleet and any replica can answer `/api/devices`.
//!
//! - [`streams`]: exactly-once delivery of spooled records per spool stream, and gap
//!   accounting of what the agent will never send.
//! - [`telemetry`]: each device's latest report, sequence gaps, energy rates, and status.
//! - [`evidence`]: calibration evidence windows, and where the tuner is run.
//!
//! One map holds one entry per device, so one capacity check (`http.max_devices`) bounds
//! everything the fleet remembers.

mod evidence;
mod streams;
mod telemetry;

use std::collections::BTreeMap;

use thiserror::Error;
use tierd_protocol::{CalibrationReport, DeviceStatus, TelemetryReport, TierCounts};

use crate::tuner::{Certificate, Setup};
use streams::Streams;

pub use evidence::{device_costs, tuner_bins, Calibration, CALIBRATION_WINDOWS};
pub use streams::{Delivery, StreamRecord, STREAMS_PER_DEVICE};
pub use telemetry::{DeviceRecord, EnergyRates, Ingest, StatusRecord};

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

/// Everything the fleet knows about one device; each part appears with the first message of
/// its kind.
#[derive(Debug, Default)]
struct DeviceEntry {
    /// From its telemetry (and calibration) reports.
    record: Option<DeviceRecord>,
    /// From its retained status or last will.
    status: Option<StatusRecord>,
    /// From its spooled records' envelopes.
    streams: Streams,
}

#[derive(Debug)]
pub struct Fleet {
    devices: BTreeMap<String, DeviceEntry>,
    max_devices: usize,
    setup: Setup,
}

impl Fleet {
    pub fn new(max_devices: usize) -> Self {
        Fleet {
            devices: BTreeMap::new(),
            max_devices,
            setup: Setup::default(),
        }
    }

    /// Tunes with `setup` instead of the default (99 % agreement, 95 % confidence).
    pub fn with_tuner(mut self, setup: Setup) -> Self {
        self.setup = setup;
        self
    }

    /// The device's entry, made on first contact unless the fleet is full: the one capacity
    /// check.
    fn entry(&mut self, device: &str) -> Result<&mut DeviceEntry, FleetError> {
        if !self.devices.contains_key(device) && self.devices.len() >= self.max_devices {
            return Err(FleetError::Full(self.max_devices, device.to_string()));
        }
        Ok(self.devices.entry(device.to_string()).or_default())
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
        Ok(self.entry(device)?.streams.accept(stream_id, seq, floor))
    }

    /// The device's most recently active spool stream.
    pub fn stream(&self, device: &str) -> Option<&StreamRecord> {
        self.devices.get(device).and_then(|e| e.streams.latest())
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
        let entry = self.entry(topic_device)?;
        Ok(match &mut entry.record {
            Some(rec) => rec.update(report, now_ms),
            None => {
                entry.record = Some(DeviceRecord::first(report, 0, now_ms));
                Ingest::New
            }
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
        if !evidence::well_formed(&c) {
            return Err(FleetError::BadCalibration(c.device_id));
        }
        let setup = self.setup;
        let Some(rec) = self
            .devices
            .get_mut(topic_device)
            .and_then(|e| e.record.as_mut())
        else {
            return Err(FleetError::NoTelemetry(c.device_id));
        };
        evidence::add_window(rec, c, &setup);
        Ok(())
    }

    /// The tuner's latest proposal for a device, with the threshold the device runs.
    pub fn proposal(&self, device_id: &str) -> Option<(Certificate, f32)> {
        self.get(device_id).and_then(evidence::proposal)
    }

    /// Records a status message. A status from an older agent run than the one already known
    /// is ignored, so a late last will cannot mark a restarted device offline.
    pub fn set_status(
        &mut self,
        device_id: &str,
        status: DeviceStatus,
        now_ms: u64,
    ) -> Result<(), FleetError> {
        telemetry::file_status(&mut self.entry(device_id)?.status, status, now_ms);
        Ok(())
    }

    pub fn status(&self, device_id: &str) -> Option<&StatusRecord> {
        self.devices.get(device_id).and_then(|e| e.status.as_ref())
    }

    pub fn statuses(&self) -> impl Iterator<Item = (&String, &StatusRecord)> {
        self.devices
            .iter()
            .filter_map(|(id, e)| e.status.as_ref().map(|s| (id, s)))
    }

    /// Devices that have sent telemetry.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceRecord> {
        self.devices.values().filter_map(|e| e.record.as_ref())
    }

    pub fn get(&self, device_id: &str) -> Option<&DeviceRecord> {
        self.devices.get(device_id).and_then(|e| e.record.as_ref())
    }

    /// How many devices have sent telemetry.
    pub fn len(&self) -> usize {
        self.devices().count()
    }

    pub fn is_empty(&self) -> bool {
        self.devices().next().is_none()
    }

    /// Sum of the latest totals of every device.
    pub fn totals(&self) -> TierCounts {
        self.devices()
            .fold(TierCounts::default(), |acc, d| acc.plus(d.latest.totals))
    }
}

/// Test data shared by the fleet's tests.
#[cfg(test)]
pub(crate) mod testing {
    use tierd_protocol::{DeviceContext, EnergyReport, TelemetryReport, TierCounts};

    pub(crate) fn report(device: &str, boot: u64, seq: u64, edge: u64) -> TelemetryReport {
        TelemetryReport {
            device_id: device.into(),
            boot_id: boot,
            seq,
            window_start_ms: seq * 1000,
            window_end_ms: seq * 1000 + 1000,
            model: "m@1".into(),
            threshold: 0.9,
            signal: tierd_protocol::Signal::MaxProb,
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
}

#[cfg(test)]
mod tests {
    use super::testing::report;
    use super::*;

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

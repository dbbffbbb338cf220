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
//!
//! ## What is believed (evidence checks)
//!
//! Anyone who can publish on a device's topics can try to steer the tuner or freeze the fleet
//! view; with the shipped broker ACL only the device itself can, and these checks bound what
//! even a lying device can claim. A record that fails one is rejected with the reason and
//! counted; one of a boot not believed is also not acknowledged, so the device keeps it and a
//! forged one cannot have real reports deleted from its spool (see `intake`):
//! - a `boot_id` (the agent's start, Unix ms) ahead of the relay's clock by more than
//!   [`MAX_CLOCK_SKEW_MS`] is not a real boot;
//! - a telemetry report of a boot newer than the one the device announced with its status on
//!   connect is not believed (a new boot arrives with the device's status first, on the same
//!   connection); an offline status for a boot newer than the announced one neither;
//! - a calibration window must belong to the device's current boot, be counted once, count
//!   (with the boot's earlier windows) no more requests than its telemetry answered, and hold
//!   no more audits than its audit rate can produce (see [`evidence::plausible`]).

mod evidence;
mod streams;
mod telemetry;

use std::collections::BTreeMap;

use thiserror::Error;
use tierd_protocol::{CalibrationReport, DeviceStatus, TelemetryReport, TierCounts};

use crate::tuner::Setup;
use streams::Streams;

pub use evidence::{
    device_costs, model_name, tuner_bins, Calibration, OfflineTrust, Proposal, MAX_FURTHER_MODELS,
    MAX_WINDOWS,
};

/// How far ahead of the relay's clock a `boot_id` (Unix ms at the agent's start) may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;
pub use streams::{Delivery, StreamRecord, STREAMS_PER_DEVICE};
pub use telemetry::{DeviceRecord, EnergyRates, IdCollision, Ingest, StatusRecord};

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
    #[error(
        "{what} from {device:?} has boot_id {boot_id}, ahead of the relay's clock ({now_ms}): \
         not a real boot"
    )]
    FutureBoot {
        what: &'static str,
        device: String,
        boot_id: u64,
        now_ms: u64,
    },
    #[error(
        "{what} from {device:?} is of boot {boot_id}, newer than the boot its status announced \
         ({announced}); not believed until the device announces it"
    )]
    UnannouncedBoot {
        what: &'static str,
        device: String,
        boot_id: u64,
        announced: String,
    },
    #[error("calibration report from {device:?} is implausible: {why}")]
    Implausible { device: String, why: String },
    #[error(
        "calibration report from {device:?} is of model {model:?}, which the device did not \
         announce (its telemetry reports {primary:?}; its status announces {announced:?})"
    )]
    UnannouncedModel {
        device: String,
        model: String,
        primary: String,
        announced: Vec<String>,
    },
    #[error(
        "calibration report from {device:?} is of model {model:?}, but the relay already holds \
         the evidence of {max} further models of the device, all still announced"
    )]
    TooManyModels {
        device: String,
        model: String,
        max: usize,
    },
}

/// Refuses a `boot_id` ahead of the relay's clock.
fn check_boot_clock(
    what: &'static str,
    device: &str,
    boot_id: u64,
    now_ms: u64,
) -> Result<(), FleetError> {
    if boot_id > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(FleetError::FutureBoot {
            what,
            device: device.to_string(),
            boot_id,
            now_ms,
        });
    }
    Ok(())
}

/// Refuses a boot newer than the one the device's status announced.
fn check_announced(
    what: &'static str,
    device: &str,
    boot_id: u64,
    status: Option<&StatusRecord>,
) -> Result<(), FleetError> {
    match status {
        Some(s) if boot_id <= s.boot_id => Ok(()),
        _ => Err(FleetError::UnannouncedBoot {
            what,
            device: device.to_string(),
            boot_id,
            announced: status.map_or_else(|| "none yet".to_string(), |s| s.boot_id.to_string()),
        }),
    }
}

/// Everything the fleet knows about one device; each part appears with the first message of
/// its kind.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
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
    /// `name@version` of the model this relay answers with: offline certificates must be
    /// against it.
    reference: Option<String>,
    /// What the dashboard plots (bounded; in memory only).
    history: crate::dashboard::history::History,
}

impl Fleet {
    pub fn new(max_devices: usize) -> Self {
        Fleet {
            devices: BTreeMap::new(),
            max_devices,
            setup: Setup::default(),
            reference: None,
            history: Default::default(),
        }
    }

    /// The dashboard's bounded history of the devices ([`crate::dashboard::history`]).
    pub fn history(&self) -> &crate::dashboard::history::History {
        &self.history
    }

    pub fn history_mut(&mut self) -> &mut crate::dashboard::history::History {
        &mut self.history
    }

    /// Offline certificates are believed only against `model` (`name@version`).
    pub fn with_reference(mut self, model: impl Into<String>) -> Self {
        self.reference = Some(model.into());
        self
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
    ///
    /// [`Delivery::Deliver`] does not move the stream on: call [`Fleet::commit`] once the
    /// record was filed (or finally judged), so a record held back is never acknowledged.
    pub fn accept(
        &mut self,
        device: &str,
        stream_id: u64,
        seq: u64,
        floor: u64,
    ) -> Result<(Delivery, Option<u64>), FleetError> {
        Ok(self.entry(device)?.streams.accept(stream_id, seq, floor))
    }

    /// Record `seq` of `stream_id`, delivered by [`Fleet::accept`], was filed: the stream moves
    /// on. Returns the cumulative acknowledgement to send.
    pub fn commit(&mut self, device: &str, stream_id: u64, seq: u64) -> Option<u64> {
        self.devices
            .get_mut(device)
            .and_then(|e| e.streams.commit(stream_id, seq))
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
        check_boot_clock("telemetry report", topic_device, report.boot_id, now_ms)?;
        let entry = self.entry(topic_device)?;
        let known_boot = entry.record.as_ref().map(|r| r.boot_id);
        if known_boot.is_none_or(|b| report.boot_id > b) {
            check_announced(
                "telemetry report",
                topic_device,
                report.boot_id,
                entry.status.as_ref(),
            )?;
        }
        let outcome = match &mut entry.record {
            Some(rec) => rec.update(report, now_ms),
            None => {
                entry.record = Some(DeviceRecord::first(report, 0, now_ms));
                Ingest::New
            }
        };
        if let Some(r) = self
            .devices
            .get(topic_device)
            .and_then(|e| e.record.as_ref())
        {
            self.history.record_report(topic_device, &r.latest, now_ms);
        }
        Ok(outcome)
    }

    /// Adds a window of calibration evidence and re-runs the tuner for the device, if it is
    /// plausible ([`evidence::plausible`]). `configured_audit_rate`: the audit rate the relay
    /// knows the device runs (from a config it acknowledged), checked instead of the claimed one.
    pub fn ingest_calibration(
        &mut self,
        topic_device: &str,
        c: CalibrationReport,
        configured_audit_rate: Option<f32>,
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
        let reference = self.reference.clone();
        let Some((rec, status)) = self
            .devices
            .get_mut(topic_device)
            .and_then(|e| e.record.as_mut().map(|r| (r, e.status.as_ref())))
        else {
            return Err(FleetError::NoTelemetry(c.device_id));
        };
        // The offline certificate the device announced for this model; a model it did not
        // announce at all is not believed.
        let model = if evidence::is_primary(rec, &c.model) {
            status.and_then(|s| s.model.clone())
        } else {
            let announced = status.map_or(&[][..], |s| &s.models[..]);
            let Some(served) = announced.iter().find(|m| m.model == c.model) else {
                return Err(FleetError::UnannouncedModel {
                    device: c.device_id,
                    model: c.model.chars().take(80).collect(),
                    primary: rec.latest.model.clone(),
                    announced: announced.iter().map(|m| m.model.clone()).collect(),
                });
            };
            let name = model_name(&c.model);
            if !rec.models.contains_key(name) && rec.models.len() >= MAX_FURTHER_MODELS {
                // Evidence of models the device no longer serves makes room.
                rec.models
                    .retain(|n, _| announced.iter().any(|m| model_name(&m.model) == n));
                if rec.models.len() >= MAX_FURTHER_MODELS {
                    return Err(FleetError::TooManyModels {
                        device: c.device_id,
                        model: c.model,
                        max: MAX_FURTHER_MODELS,
                    });
                }
            }
            served.calibration.clone()
        };
        if let Err(why) = evidence::plausible(rec, &c, configured_audit_rate) {
            return Err(FleetError::Implausible {
                device: c.device_id,
                why,
            });
        }
        evidence::add_window(rec, c, &setup, model.as_ref(), reference.as_deref());
        Ok(())
    }

    /// The threshold a device should run for `model` (a name; `None`: its primary) and the
    /// certificates behind it.
    pub fn proposal(&self, device_id: &str, model: Option<&str>) -> Option<Proposal> {
        self.get(device_id)
            .and_then(|rec| evidence::proposal(rec, model))
    }

    /// Records a status message. A status from an older agent run than the one already known
    /// is ignored, so a late last will cannot mark a restarted device offline; an offline
    /// status for a newer run than the announced one is refused (a will follows an online
    /// status of the same run). Returns the collision when another machine announced itself
    /// under an id already online.
    pub fn set_status(
        &mut self,
        device_id: &str,
        status: DeviceStatus,
        now_ms: u64,
    ) -> Result<Option<IdCollision>, FleetError> {
        check_boot_clock("status", device_id, status.boot_id, now_ms)?;
        let entry = self.entry(device_id)?;
        if !status.online && entry.status.is_some() {
            check_announced(
                "offline status",
                device_id,
                status.boot_id,
                entry.status.as_ref(),
            )?;
        }
        let collision = telemetry::file_status(&mut entry.status, status, now_ms);
        if let Some(online) = entry.status.as_ref().map(|s| s.online) {
            self.history.record_status(device_id, online, now_ms);
        }
        Ok(collision)
    }

    pub fn status(&self, device_id: &str) -> Option<&StatusRecord> {
        self.devices.get(device_id).and_then(|e| e.status.as_ref())
    }

    pub fn statuses(&self) -> impl Iterator<Item = (&String, &StatusRecord)> {
        self.devices
            .iter()
            .filter_map(|(id, e)| e.status.as_ref().map(|s| (id, s)))
    }

    /// A device's bookkeeping (streams, status, latest telemetry; not its evidence, see
    /// [`Fleet::stored_evidence`]) as the fleet store keeps it.
    pub fn stored_device(&mut self, device_id: &str) -> Option<Result<String, serde_json::Error>> {
        let entry = self.devices.get_mut(device_id)?;
        // The evidence is stored apart: out of the body while it is written.
        let evidence = entry
            .record
            .as_mut()
            .map(|r| (r.calibration.take(), std::mem::take(&mut r.models)));
        let body = serde_json::to_string(&*entry);
        if let (Some(r), Some((calibration, models))) = (entry.record.as_mut(), evidence) {
            r.calibration = calibration;
            r.models = models;
        }
        Some(body)
    }

    /// A device's calibration evidence of every model, as the fleet store keeps it.
    pub fn stored_evidence(&self, device_id: &str) -> Option<Result<String, serde_json::Error>> {
        let rec = self.get(device_id)?;
        Some(evidence::to_stored(rec))
    }

    /// Puts back a device's bookkeeping from the store (its evidence, if held, is kept).
    pub fn restore_device(&mut self, device_id: &str, body: &str) -> Result<(), serde_json::Error> {
        let mut stored: DeviceEntry = serde_json::from_str(body)?;
        let entry = self.devices.entry(device_id.to_string()).or_default();
        if let (Some(new), Some(old)) = (stored.record.as_mut(), entry.record.as_mut()) {
            new.calibration = old.calibration.take();
            new.models = std::mem::take(&mut old.models);
        }
        *entry = stored;
        if let Some(r) = &entry.record {
            self.history
                .record_report(device_id, &r.latest, r.last_seen_ms);
        }
        Ok(())
    }

    /// Puts back a device's evidence from the store; `false` if the device has no record to
    /// hold it (its bookkeeping row comes first).
    pub fn restore_evidence(
        &mut self,
        device_id: &str,
        body: &str,
    ) -> Result<bool, serde_json::Error> {
        match self
            .devices
            .get_mut(device_id)
            .and_then(|e| e.record.as_mut())
        {
            Some(rec) => evidence::restore(rec, body).map(|()| true),
            None => Ok(false),
        }
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

    /// Files `device`'s online status for `boot`, as its agent does on connect.
    pub(crate) fn online(f: &mut super::Fleet, device: &str, boot: u64) {
        let status = tierd_protocol::DeviceStatus {
            online: true,
            boot_id: boot,
            reason: String::new(),
            model: None,
            models: Vec::new(),
            machine: None,
        };
        f.set_status(device, status, boot).expect("status");
    }

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
    use super::testing::{online, report};
    use super::*;

    #[test]
    fn boots_from_the_future_or_unannounced_are_not_believed() {
        let mut f = Fleet::new(4);
        let now = 1_800_000_000_000;
        // No status yet: a report alone does not make a device (or a ghost).
        assert!(matches!(
            f.ingest("a", report("a", now - 5, 1, 5), now),
            Err(FleetError::UnannouncedBoot { .. })
        ));
        assert!(f.is_empty());
        online(&mut f, "a", now - 5);
        assert_eq!(
            f.ingest("a", report("a", now - 5, 1, 5), now),
            Ok(Ingest::New)
        );
        // A sniffed report re-sent with a boot far ahead: refused, the record unchanged.
        let e = f.ingest("a", report("a", 1 << 63, 2, 5), now).unwrap_err();
        assert!(matches!(e, FleetError::FutureBoot { .. }), "{e}");
        // A plausible new boot the device never announced: refused too.
        assert!(matches!(
            f.ingest("a", report("a", now, 2, 5), now),
            Err(FleetError::UnannouncedBoot { .. })
        ));
        assert_eq!(
            f.get("a").map(|d| (d.boot_id, d.last_seq)),
            Some((now - 5, 1))
        );
        assert_eq!(
            f.ingest("a", report("a", now - 5, 2, 5), now),
            Ok(Ingest::Next)
        );
        // A retained offline status with a huge boot, or for a boot never announced.
        let offline = |boot_id| DeviceStatus {
            online: false,
            boot_id,
            reason: "forged".into(),
            model: None,
            models: Vec::new(),
            machine: None,
        };
        assert!(f.set_status("a", offline(u64::MAX), now).is_err());
        assert!(f.set_status("a", offline(now), now).is_err());
        assert_eq!(f.status("a").map(|s| s.online), Some(true));
        // The announced restart is believed.
        online(&mut f, "a", now);
        assert_eq!(
            f.ingest("a", report("a", now, 1, 5), now),
            Ok(Ingest::Restart)
        );
    }

    #[test]
    fn rejects_forged_topics_bad_windows_and_too_many_devices() {
        let mut f = Fleet::new(1);
        online(&mut f, "a", 1);
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
            f.set_status(
                "c",
                DeviceStatus {
                    online: true,
                    boot_id: 1,
                    reason: String::new(),
                    model: None,
                    models: Vec::new(),
                    machine: None,
                },
                0
            ),
            Err(FleetError::Full(1, _))
        ));
        assert_eq!(f.len(), 1);
    }
}

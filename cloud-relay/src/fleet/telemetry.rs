//! The latest telemetry of each device, with sequence-gap accounting, its energy rates, and its
//! online/offline status.

use serde::{Deserialize, Serialize};
use tierd_protocol::{DeviceStatus, TelemetryReport, TierCounts};

use super::evidence::Calibration;

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
    /// A calibration window, added to the device's evidence (see
    /// [`Fleet::ingest_calibration`](super::Fleet::ingest_calibration)).
    Calibration,
}

/// Per-device bookkeeping, serialized as-is by `/api/devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The evidence of the model the telemetry reports (the primary).
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// The evidence of each further model the device serves, by model name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub models: std::collections::BTreeMap<String, Calibration>,
}

/// Joules per local inference and modelled radio joules per escalation, as last measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub online: bool,
    pub boot_id: u64,
    pub reason: String,
    /// Relay clock, Unix ms, when it arrived.
    pub since_ms: u64,
    /// The model and offline certificate its last online status announced.
    pub model: Option<tierd_protocol::ModelCalibration>,
    /// The further models it announced, with their offline certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<tierd_protocol::ServedModel>,
    /// The machine tag of the agent that sent it (see `edge_agent::identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Times a second machine announced itself online under this id while another was
    /// online (boards cloned from one image); and the two machines of the latest one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id_collisions: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub collision_machines: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Two machines claiming one device id: the one known online, and the newcomer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdCollision {
    pub known: String,
    pub other: String,
    pub collisions: u64,
}

impl DeviceRecord {
    /// The record after the first report of an agent run (`restarts` runs before it).
    pub(super) fn first(report: TelemetryReport, restarts: u64, now_ms: u64) -> Self {
        DeviceRecord {
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
            models: Default::default(),
        }
    }

    /// Files a later report of the same device (already checked to be its own and sane).
    pub(super) fn update(&mut self, report: TelemetryReport, now_ms: u64) -> Ingest {
        if report.boot_id < self.boot_id {
            return Ingest::Stale;
        }
        if report.boot_id > self.boot_id {
            let restarts = self.restarts + 1;
            // Evidence is about the model and traffic, not the agent run: keep it.
            let calibration = self.calibration.take();
            let models = std::mem::take(&mut self.models);
            let rates = self.energy_rates;
            *self = DeviceRecord::first(report, restarts, now_ms);
            self.calibration = calibration;
            self.models = models;
            self.energy_rates = EnergyRates {
                joules_per_inference: self
                    .energy_rates
                    .joules_per_inference
                    .or(rates.joules_per_inference),
                radio_joules_per_escalation: self
                    .energy_rates
                    .radio_joules_per_escalation
                    .or(rates.radio_joules_per_escalation),
            };
            return Ingest::Restart;
        }
        if report.seq <= self.last_seq {
            self.duplicate_reports += 1;
            return Ingest::Duplicate;
        }
        let missing = report.seq - self.last_seq - 1;
        self.missing_reports += missing;
        self.last_seq = report.seq;
        self.reports += 1;
        self.last_seen_ms = now_ms;
        self.window_sums = self.window_sums.plus(report.window);
        self.energy_rates.update(&report);
        self.latest = report;
        if missing == 0 {
            Ingest::Next
        } else {
            Ingest::Gap { missing }
        }
    }
}

/// Files a status message into a device's slot. A status from an older agent run than the one
/// already known is ignored, so a late last will cannot mark a restarted device offline.
///
/// An online status from another machine than the one known online is a collision (two boards
/// with one `device_id`), returned so the caller can warn; it is counted whichever run is newer.
pub(super) fn file_status(
    slot: &mut Option<StatusRecord>,
    status: DeviceStatus,
    now_ms: u64,
) -> Option<IdCollision> {
    let collision = match (slot.as_mut(), status.machine.as_deref()) {
        (Some(known), Some(other))
            if known.online
                && status.online
                && known.machine.as_deref().is_some_and(|k| k != other) =>
        {
            known.id_collisions += 1;
            let k = known.machine.clone().unwrap_or_default();
            known.collision_machines = vec![k.clone(), other.to_owned()];
            Some(IdCollision {
                known: k,
                other: other.to_owned(),
                collisions: known.id_collisions,
            })
        }
        _ => None,
    };
    if slot
        .as_ref()
        .is_some_and(|known| status.boot_id < known.boot_id)
    {
        return collision;
    }
    // An offline status (the last will, set before the model was known) keeps the models.
    let (model, models) = if status.online {
        (status.model, status.models)
    } else {
        slot.as_ref()
            .map(|s| (s.model.clone(), s.models.clone()))
            .unwrap_or_default()
    };
    let (id_collisions, collision_machines) = slot
        .as_ref()
        .map(|s| (s.id_collisions, s.collision_machines.clone()))
        .unwrap_or_default();
    *slot = Some(StatusRecord {
        online: status.online,
        boot_id: status.boot_id,
        reason: status.reason,
        since_ms: now_ms,
        model,
        models,
        machine: status.machine,
        id_collisions,
        collision_machines,
    });
    collision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testing::{online, report};
    use crate::fleet::Fleet;

    #[test]
    fn contiguous_reports_sum_to_the_totals() {
        let mut f = Fleet::new(10);
        online(&mut f, "a", 1);
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
        online(&mut f, "a", 1);
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
        online(&mut f, "a", 2);
        assert_eq!(f.ingest("a", report("a", 2, 1, 7), 0), Ok(Ingest::Restart));
        assert_eq!(f.get("a").map(|d| (d.restarts, d.last_seq)), Some((1, 1)));
        assert_eq!(f.ingest("a", report("a", 1, 9, 5), 0), Ok(Ingest::Stale));
        assert_eq!(f.get("a").map(|d| d.latest.totals.edge), Some(7));
    }

    #[test]
    fn energy_rates_survive_idle_windows_and_restarts() {
        let mut f = Fleet::new(10);
        online(&mut f, "a", 2);
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
        online(&mut f, "a", 1);
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
            model: None,
            models: Vec::new(),
            machine: None,
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
    fn two_machines_online_under_one_id_are_a_collision() {
        let mut f = Fleet::new(10);
        let st = |online, boot_id, machine: &str| DeviceStatus {
            online,
            boot_id,
            reason: if online { "" } else { "stopped" }.into(),
            model: None,
            models: Vec::new(),
            machine: Some(machine.into()),
        };
        assert_eq!(f.set_status("a", st(true, 1, "m1"), 0), Ok(None));
        // The same machine restarting is not one.
        assert_eq!(f.set_status("a", st(true, 2, "m1"), 1), Ok(None));
        // A clone comes up, whether its run is newer or older.
        let c = f
            .set_status("a", st(true, 3, "m2"), 2)
            .unwrap()
            .expect("collision");
        assert_eq!(
            (c.known.as_str(), c.other.as_str(), c.collisions),
            ("m1", "m2", 1)
        );
        let c = f
            .set_status("a", st(true, 2, "m1"), 3)
            .unwrap()
            .expect("collision");
        assert_eq!(c.collisions, 2);
        let s = f.status("a").unwrap();
        assert_eq!((s.id_collisions, s.machine.as_deref()), (2, Some("m2")));
        // A board replaced after a clean stop is not one.
        let mut g = Fleet::new(10);
        g.set_status("b", st(true, 1, "m1"), 0).unwrap();
        g.set_status("b", st(false, 1, "m1"), 1).unwrap();
        assert_eq!(g.set_status("b", st(true, 2, "m9"), 2), Ok(None));
        // An agent without a machine id (a container) never collides.
        let mut h = Fleet::new(10);
        h.set_status("c", st(true, 1, "m1"), 0).unwrap();
        let anon = DeviceStatus {
            machine: None,
            ..st(true, 2, "")
        };
        assert_eq!(h.set_status("c", anon, 1), Ok(None));
    }
}

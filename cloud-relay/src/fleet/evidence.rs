//! Calibration evidence: each device's sliding window of labelled outcomes per confidence bin,
//! and the tuning trigger. Every window filed re-runs the tuner for that device (the one place
//! in the fleet the tuner is called); its certificate is the device's proposal.

use std::collections::VecDeque;

use serde::Serialize;
use tierd_protocol::{BinCounts, CalibrationReport, LatencySeries, Signal, TelemetryReport};

use super::telemetry::DeviceRecord;
use crate::tuner::{self, Bin, Certificate, DeviceCosts, Outcomes, Setup};

/// Calibration windows kept per device: the tuner's sliding evidence window.
pub const CALIBRATION_WINDOWS: usize = 20;

/// A device's recent evidence and what the tuner makes of it.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub signal: Signal,
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

/// Whether a report's bin edges are usable: one per bin, strictly increasing, within [0, 1].
pub(super) fn well_formed(c: &CalibrationReport) -> bool {
    c.edges.len() == c.bins.len()
        && !c.edges.is_empty()
        && c.edges.windows(2).all(|w| w[0] < w[1])
        && c.edges.iter().all(|e| (0.0..=1.0).contains(e))
}

/// Adds a window of calibration evidence to a device's record and re-runs the tuner.
pub(super) fn add_window(rec: &mut DeviceRecord, c: CalibrationReport, setup: &Setup) {
    // Disjoint fields: the report is read while the calibration is updated.
    let latest = &rec.latest;
    let cal = rec.calibration.get_or_insert_with(|| Calibration {
        signal: c.signal,
        edges: c.edges.clone(),
        audit_rate: c.audit_rate,
        bins: Vec::new(),
        certificate: tune(setup, &[], latest),
        windows: VecDeque::new(),
    });
    // New bins or a new signal make old evidence incomparable: start over.
    if cal.edges != c.edges || cal.signal != c.signal {
        cal.windows.clear();
        cal.edges = c.edges.clone();
        cal.signal = c.signal;
    }
    cal.audit_rate = c.audit_rate;
    cal.windows.push_back(c.bins);
    while cal.windows.len() > CALIBRATION_WINDOWS {
        cal.windows.pop_front();
    }
    cal.bins = sum_bins(&cal.windows, cal.edges.len());
    cal.certificate = tune(setup, &tuner_bins(&cal.edges, &cal.bins), latest);
}

/// The tuner's latest proposal for the device, with the threshold the device runs.
pub(super) fn proposal(rec: &DeviceRecord) -> Option<(Certificate, f32)> {
    let c = rec.calibration.as_ref()?;
    Some((c.certificate.clone(), rec.latest.threshold))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testing::report;
    use crate::fleet::{Fleet, FleetError};

    fn calibration(device: &str, bins: Vec<BinCounts>) -> CalibrationReport {
        let n = bins.len();
        CalibrationReport {
            device_id: device.into(),
            boot_id: 1,
            seq: 1,
            signal: Signal::MaxProb,
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
}

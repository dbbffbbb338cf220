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
    /// `(boot_id, seq)` of the last window filed: each is counted once, in order.
    #[serde(skip)]
    last_window: (u64, u64),
    /// Requests counted by the windows filed in that boot.
    #[serde(skip)]
    boot_requests: u64,
}

/// Audits a window may hold beyond its audit rate's expectation: `n·r + 6·sqrt(n·r) + 10` for
/// `n` local answers at rate `r`. A screen against forged evidence, not a statistical test: a
/// binomial count exceeds its mean by 6 standard deviations (≤ sqrt(n·r)) with probability
/// below 1e-8 (Chebyshev–Cantelli gives 1/37 without assumptions; the binomial tail is far
/// thinner), and the +10 keeps tiny windows out of reach. It errs toward accepting.
pub fn max_plausible_audits(local: u64, rate: f32) -> u64 {
    let mean = local as f64 * f64::from(rate.clamp(0.0, 1.0));
    (mean + 6.0 * mean.sqrt() + 10.0).ceil() as u64
}

/// Whether a calibration window can be true of the device that sent it (see the module docs
/// of `fleet`): its current boot, not yet counted (seqs only grow), each bin consistent, no
/// more requests over the boot's windows than its telemetry answered (give or take those in
/// flight), and, over the sliding evidence window with it, audits within what
/// `configured_audit_rate` (else the claimed rate) can produce. `Err` says why not.
///
/// A real agent never trips these; hence the generous slack.
pub(super) fn plausible(
    rec: &DeviceRecord,
    c: &CalibrationReport,
    configured_audit_rate: Option<f32>,
) -> Result<(), String> {
    if c.boot_id != rec.boot_id {
        return Err(format!(
            "boot {} is not the device's current boot {}",
            c.boot_id, rec.boot_id
        ));
    }
    if let Some(cal) = rec.calibration.as_ref() {
        if cal.last_window.0 == c.boot_id && c.seq <= cal.last_window.1 {
            return Err(format!("window seq {} was already counted", c.seq));
        }
    }
    for (i, b) in c.bins.iter().enumerate() {
        // (Audits are counted when they complete, possibly in a later window than the local
        // answer they check: `audited <= local` holds over the sliding window, below, not per
        // window.)
        if b.escalated_labelled > b.escalated
            || b.escalated_agree > b.escalated_labelled
            || b.audited_agree > b.audited
        {
            return Err(format!(
                "bin {i} counts more labels or agreements than requests: {b:?}"
            ));
        }
    }
    let total = c.bins.iter().fold(BinCounts::default(), |a, b| a.plus(*b));
    // Cumulative over the boot, so the skew between the two windows (requests in flight when
    // the agent took them) does not add up: every window of this boot together cannot count
    // more requests than the boot's latest totals answered, give or take those in flight.
    let answered = rec.latest.totals.answered();
    let slack = 64 + answered / 20;
    let before = rec
        .calibration
        .as_ref()
        .filter(|cal| cal.last_window.0 == c.boot_id)
        .map_or(0, |cal| cal.boot_requests);
    let counted = before
        .saturating_add(total.escalated)
        .saturating_add(total.local);
    if counted > answered.saturating_add(slack) {
        return Err(format!(
            "{counted} requests in this boot's windows, but its telemetry answered {answered}"
        ));
    }
    // Audits over the sliding window with this one, which an audit's lag cannot cross.
    let (mut local, mut audited) = (total.local, total.audited);
    if let Some(cal) = rec.calibration.as_ref().filter(|cal| cal.edges == c.edges) {
        for b in &cal.bins {
            local = local.saturating_add(b.local);
            audited = audited.saturating_add(b.audited);
        }
    }
    let rate = configured_audit_rate.unwrap_or(c.audit_rate);
    let cap = max_plausible_audits(local, rate);
    if audited > cap {
        return Err(format!(
            "{audited} audits of {local} local answers, far above the audit rate {rate} \
             (at most {cap})"
        ));
    }
    Ok(())
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
        last_window: (0, 0),
        boot_requests: 0,
    });
    let counted: u64 = c.bins.iter().map(|b| b.escalated + b.local).sum();
    if cal.last_window.0 != c.boot_id {
        cal.boot_requests = 0;
    }
    cal.boot_requests = cal.boot_requests.saturating_add(counted);
    cal.last_window = (c.boot_id, c.seq);
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
    use crate::fleet::testing::{online, report};
    use crate::fleet::{Fleet, FleetError};

    /// Telemetry report `seq` of boot 1 answering `answered` requests locally.
    fn telemetry(f: &mut Fleet, seq: u64, answered: u64) {
        f.ingest("a", report("a", 1, seq, answered), 0)
            .expect("telemetry");
    }

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
            f.ingest_calibration("a", calibration("a", vec![BinCounts::default(); 4]), None),
            Err(FleetError::NoTelemetry(_))
        ));
        online(&mut f, "a", 1);
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
        for seq in 1..=(CALIBRATION_WINDOWS as u64 + 5) {
            telemetry(&mut f, seq, 1000);
            let mut c = calibration("a", window.clone());
            c.seq = seq;
            f.ingest_calibration("a", c, None).expect("calibration");
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
            f.ingest_calibration("a", bad, None),
            Err(FleetError::BadCalibration(_))
        ));
    }

    #[test]
    fn forged_evidence_is_refused_and_changes_nothing() {
        let mut f = Fleet::new(10);
        online(&mut f, "a", 1);
        telemetry(&mut f, 1, 1000);
        let honest = vec![
            BinCounts {
                escalated: 200,
                escalated_labelled: 200,
                escalated_agree: 150,
                ..Default::default()
            },
            BinCounts {
                local: 800,
                audited: 20,
                audited_agree: 20,
                ..Default::default()
            },
        ];
        let mut c = calibration("a", honest.clone());
        c.audit_rate = 0.02;
        f.ingest_calibration("a", c.clone(), Some(0.02))
            .expect("honest");
        let before = f.get("a").and_then(|d| d.calibration.clone()).expect("cal");
        let refused = |f: &mut Fleet, c: CalibrationReport, needle: &str| match f
            .ingest_calibration("a", c, Some(0.02))
        {
            Err(FleetError::Implausible { why, .. }) => {
                assert!(why.contains(needle), "{needle:?} not in {why:?}")
            }
            other => panic!("{needle}: {other:?}"),
        };
        // The same window again.
        refused(&mut f, c.clone(), "already counted");
        // The incident: 100,000 fake audited agreements per bin.
        telemetry(&mut f, 2, 1000);
        let mut forged = c.clone();
        forged.seq = 2;
        for b in &mut forged.bins {
            b.local += 100_000;
            b.audited += 100_000;
            b.audited_agree += 100_000;
        }
        refused(&mut f, forged.clone(), "but its telemetry answered 2000");
        // Within the request count, but audited far above the configured rate (claiming 1.0).
        let mut greedy = c.clone();
        greedy.seq = 2;
        greedy.audit_rate = 1.0;
        greedy.bins[1].audited = 800;
        greedy.bins[1].audited_agree = 800;
        refused(&mut f, greedy, "far above the audit rate 0.02");
        // More agreements than labels; another boot; a stale seq.
        let mut broken = c.clone();
        broken.seq = 2;
        broken.bins[0].escalated_agree = 201;
        refused(&mut f, broken, "more labels or agreements");
        let mut other_boot = c.clone();
        other_boot.seq = 2;
        other_boot.boot_id = 9;
        refused(&mut f, other_boot, "not the device's current boot");
        refused(&mut f, c.clone(), "already counted");
        let after = f.get("a").and_then(|d| d.calibration.clone()).expect("cal");
        assert_eq!(after.bins, before.bins);
        assert_eq!(after.certificate.threshold, before.certificate.threshold);
        // The honest next window is taken.
        let mut next = c;
        next.seq = 2;
        f.ingest_calibration("a", next, Some(0.02))
            .expect("next honest window");
    }

    #[test]
    fn the_audit_screen_errs_toward_accepting() {
        assert_eq!(max_plausible_audits(0, 0.02), 10);
        // 1,000 local answers at 2 %: mean 20, cap 20 + 6·4.47 + 10 = 57.
        assert_eq!(max_plausible_audits(1000, 0.02), 57);
        assert!(max_plausible_audits(100_000, 0.5) < 52_000);
    }
}

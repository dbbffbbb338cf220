//! Calibration evidence: each device's sliding window of labelled outcomes per confidence bin,
//! and the tuning trigger. Every window filed re-runs the tuner for that device (the one place
//! in the fleet the tuner is called); its certificate is the device's proposal.
//!
//! An agent serving several models sends one window per model; each model has its own
//! evidence, certificate and proposal (the primary's in `DeviceRecord::calibration`, the
//! others' in `DeviceRecord::models`). A model's window is filed only if the device announced
//! the model (the primary in its telemetry, the others in its status). The device's energy and
//! escalation latency figures, which `min_cost` weighs, are the device's over all its models:
//! an approximation that makes a model whose escalations are slower or costlier than the
//! average look cheaper to escalate than it is (it biases that model toward escalating).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tierd_protocol::{
    BinCounts, CalibrationReport, LatencySeries, ModelCalibration, Signal, TelemetryReport,
    MAX_THRESHOLDS_IN_FORCE,
};

use super::telemetry::DeviceRecord;
use crate::tuner::{
    self, Basis, Bin, Certificate, Cuts, DeviceCosts, InForce, Offline, Outcomes, Policy, Setup,
    Situation,
};

/// Calibration windows kept per device at most; beyond it the two adjacent windows with the
/// fewest requests merge (memory stays bounded however slow the device's traffic).
pub const MAX_WINDOWS: usize = 64;

/// See [`Calibration::offline_trust`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineTrust {
    Trusted,
    AfterDrift,
    AfterViolation,
}

/// One calibration window (or several merged): counts per bin and the thresholds in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Window {
    bins: Vec<BinCounts>,
    cuts: Cuts,
    requests: u64,
}

/// Further models (besides the primary) whose evidence a device may hold; an agent serves at
/// most 16.
pub const MAX_FURTHER_MODELS: usize = 16;

/// The name part of a `name@version` model id.
pub fn model_name(id: &str) -> &str {
    id.split_once('@').map_or(id, |(name, _)| name)
}

/// A device's recent evidence of one model and what the tuner makes of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    /// `name@version` of the edge model, as its latest window named it.
    pub model: String,
    /// The threshold the model ran when its latest window was taken.
    pub running: f32,
    pub signal: Signal,
    pub edges: Vec<f32>,
    pub audit_rate: f32,
    /// Sum of the windows' counts, per bin.
    pub bins: Vec<BinCounts>,
    /// Requests in the evidence window, and the thresholds in force while it was gathered.
    pub requests: u64,
    pub cuts: Cuts,
    /// The tuner's online proposal from this window.
    pub certificate: Certificate,
    /// The threshold the device should run and the certificate behind it (pushed or not:
    /// see `control`).
    pub in_force: InForce,
    /// The model's offline certificate, once re-derived; `offline_refused` says why not.
    pub offline: Option<Offline>,
    pub offline_refused: Option<String>,
    /// Whether the offline certificate stands in for an online one: not after a drift alarm
    /// (until traffic looks like its calibration set again) or a certified violation (until
    /// the online window certifies at or below it).
    pub offline_trust: OfflineTrust,
    /// Times the drift test fired, and the last reason.
    pub drift_alarms: u64,
    pub last_drift: Option<String>,
    #[serde(skip)]
    windows: VecDeque<Window>,
    /// `(boot_id, seq)` of the last window filed: each is counted once, in order.
    #[serde(skip)]
    last_window: (u64, u64),
    /// Requests counted by the windows filed in that boot.
    #[serde(skip)]
    boot_requests: u64,
}

/// A model's evidence as the fleet store keeps it: what the API shows, plus the windows and
/// the once-only bookkeeping it leaves out (so a restarted relay tunes on from the same
/// window and refuses the same replays).
#[derive(Serialize)]
struct StoredRef<'a> {
    #[serde(flatten)]
    shown: &'a Calibration,
    windows: &'a VecDeque<Window>,
    last_window: (u64, u64),
    boot_requests: u64,
}

#[derive(Deserialize)]
struct Stored {
    #[serde(flatten)]
    shown: Calibration,
    windows: VecDeque<Window>,
    last_window: (u64, u64),
    boot_requests: u64,
}

impl Calibration {
    fn stored(&self) -> StoredRef<'_> {
        StoredRef {
            shown: self,
            windows: &self.windows,
            last_window: self.last_window,
            boot_requests: self.boot_requests,
        }
    }
}

impl From<Stored> for Calibration {
    fn from(s: Stored) -> Self {
        Calibration {
            windows: s.windows,
            last_window: s.last_window,
            boot_requests: s.boot_requests,
            ..s.shown
        }
    }
}

/// All of a device's evidence, as one stored body.
#[derive(Serialize)]
struct StoredEvidenceRef<'a> {
    primary: Option<StoredRef<'a>>,
    models: std::collections::BTreeMap<&'a str, StoredRef<'a>>,
}

#[derive(Deserialize)]
struct StoredEvidence {
    primary: Option<Stored>,
    models: std::collections::BTreeMap<String, Stored>,
}

/// The device's evidence (every model's) as the fleet store keeps it.
pub(super) fn to_stored(rec: &DeviceRecord) -> Result<String, serde_json::Error> {
    serde_json::to_string(&StoredEvidenceRef {
        primary: rec.calibration.as_ref().map(Calibration::stored),
        models: rec
            .models
            .iter()
            .map(|(k, c)| (k.as_str(), c.stored()))
            .collect(),
    })
}

/// Puts back the evidence [`to_stored`] kept.
pub(super) fn restore(rec: &mut DeviceRecord, body: &str) -> Result<(), serde_json::Error> {
    let e: StoredEvidence = serde_json::from_str(body)?;
    rec.calibration = e.primary.map(Calibration::from);
    rec.models = e
        .models
        .into_iter()
        .map(|(k, c)| (k, Calibration::from(c)))
        .collect();
    Ok(())
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
    if !(c.threshold.is_finite()
        && tierd_protocol::config::limits::THRESHOLD.contains(&c.threshold))
    {
        return Err(format!("threshold {} is outside [0, 1.01]", c.threshold));
    }
    let own = slot(rec, &c.model);
    if let Some(cal) = own {
        if cal.last_window.0 == c.boot_id && c.seq <= cal.last_window.1 {
            return Err(format!(
                "window seq {} of {} was already counted",
                c.seq, c.model
            ));
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
    // Cumulative over the boot and over every model (the telemetry counts the requests of all
    // of them), so the skew between the two windows (requests in flight when the agent took
    // them) does not add up: every window of this boot together cannot count more requests
    // than the boot's latest totals answered, give or take those in flight.
    let answered = rec.latest.totals.answered();
    let slack = 64 + answered / 20;
    let before: u64 = rec
        .calibration
        .iter()
        .chain(rec.models.values())
        .filter(|cal| cal.last_window.0 == c.boot_id)
        .map(|cal| cal.boot_requests)
        .sum();
    let counted = before
        .saturating_add(total.escalated)
        .saturating_add(total.local);
    if counted > answered.saturating_add(slack) {
        return Err(format!(
            "{counted} requests in this boot's windows, but its telemetry answered {answered}"
        ));
    }
    // Audits over the model's sliding window with this one, which an audit's lag cannot cross.
    let (mut local, mut audited) = (total.local, total.audited);
    if let Some(cal) = own.filter(|cal| cal.edges == c.edges) {
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

/// Whether `model` (`name@version`) is the device's primary: the model its telemetry reports.
pub(super) fn is_primary(rec: &DeviceRecord, model: &str) -> bool {
    model_name(model) == model_name(&rec.latest.model)
}

/// The evidence of `model` (`name@version`) the record holds, if any.
pub(super) fn slot<'a>(rec: &'a DeviceRecord, model: &str) -> Option<&'a Calibration> {
    if is_primary(rec, model) {
        rec.calibration.as_ref()
    } else {
        rec.models.get(model_name(model))
    }
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

/// Runs the tuner for one model of a device running `running`, with the device's measured
/// costs.
fn tune(
    setup: &Setup,
    bins: &[Bin],
    cuts: &Cuts,
    running: f32,
    report: &TelemetryReport,
) -> Certificate {
    tuner::tune(
        bins,
        cuts,
        setup.policy,
        running,
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

/// The thresholds a window reports, as cuts: more than the protocol allows is not believed.
fn window_cuts(c: &CalibrationReport) -> Cuts {
    if c.thresholds.len() > MAX_THRESHOLDS_IN_FORCE || c.thresholds.iter().any(|t| !t.is_finite()) {
        Cuts::Unknown
    } else {
        Cuts::Known(c.thresholds.clone())
    }
}

fn sum_windows<'a>(windows: impl Iterator<Item = &'a Window>, n: usize) -> (Vec<BinCounts>, Cuts) {
    let mut bins = vec![BinCounts::default(); n];
    let mut cuts = Cuts::Known(Vec::new());
    for w in windows {
        for (o, b) in bins.iter_mut().zip(&w.bins) {
            *o = o.plus(*b);
        }
        cuts = cuts.union(&w.cuts);
    }
    (bins, cuts)
}

/// Keeps the window within `window_requests` and [`MAX_WINDOWS`].
fn slide(windows: &mut VecDeque<Window>, window_requests: u64) {
    let mut total: u64 = windows.iter().map(|w| w.requests).sum();
    while windows.len() > 1 {
        let oldest = windows.front().map_or(0, |w| w.requests);
        if total - oldest < window_requests {
            break;
        }
        total -= oldest;
        windows.pop_front();
    }
    while windows.len() > MAX_WINDOWS {
        let i = (0..windows.len() - 1)
            .min_by_key(|&i| windows[i].requests + windows[i + 1].requests)
            .unwrap_or(0);
        if let Some(next) = windows.remove(i + 1) {
            let w = &mut windows[i];
            for (o, b) in w.bins.iter_mut().zip(&next.bins) {
                *o = o.plus(*b);
            }
            w.cuts = w.cuts.union(&next.cuts);
            w.requests += next.requests;
        }
    }
}

/// How many of the newest windows hold at least `requests` requests (all, if fewer).
fn recent_count(windows: &VecDeque<Window>, requests: u64) -> usize {
    let mut n = 0;
    let mut sum = 0;
    for w in windows.iter().rev() {
        n += 1;
        sum += w.requests;
        if sum >= requests {
            break;
        }
    }
    n
}

/// The target of the policy, if it has one.
fn target_of(policy: &Policy) -> Option<f64> {
    match *policy {
        Policy::TargetAgreement { target, .. } => Some(target),
        _ => None,
    }
}

/// Adds a window of calibration evidence to a device's record, re-runs the tuner and the drift
/// test, and decides the threshold in force. `model`: the offline certificate the device's
/// status announced; `reference`: the model this relay answers with.
pub(super) fn add_window(
    rec: &mut DeviceRecord,
    c: CalibrationReport,
    setup: &Setup,
    model: Option<&ModelCalibration>,
    reference: Option<&str>,
) {
    let primary = is_primary(rec, &c.model);
    let running = c.threshold;
    // Disjoint fields: the report is read while the calibration is updated.
    let latest = &rec.latest;
    let fresh = || {
        let certificate = tune(setup, &[], &Cuts::Unknown, running, latest);
        Calibration {
            model: c.model.clone(),
            running,
            signal: c.signal,
            edges: c.edges.clone(),
            audit_rate: c.audit_rate,
            bins: Vec::new(),
            requests: 0,
            cuts: Cuts::Known(Vec::new()),
            in_force: InForce {
                threshold: running,
                basis: Basis::Kept,
                why: certificate.note.clone(),
            },
            certificate,
            offline: None,
            offline_refused: None,
            offline_trust: OfflineTrust::Trusted,
            drift_alarms: 0,
            last_drift: None,
            windows: VecDeque::new(),
            last_window: (0, 0),
            boot_requests: 0,
        }
    };
    let cal = if primary {
        rec.calibration.get_or_insert_with(fresh)
    } else {
        rec.models
            .entry(model_name(&c.model).to_string())
            .or_insert_with(fresh)
    };
    if cal.model != c.model {
        // Another version of the model (a rollout promoted it): the old one's evidence says
        // nothing about it.
        tracing::info!(device = %rec.device_id, from = %cal.model, to = %c.model, "new model version: its evidence starts over");
        cal.windows.clear();
        cal.offline_trust = OfflineTrust::Trusted;
        cal.model = c.model.clone();
    }
    cal.running = running;
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
    // The model's offline certificate, re-derived (a new model replaces it).
    match model.map(|m| tuner::check_offline(m, &setup.policy, reference)) {
        Some(Ok(o)) => {
            if cal.offline.as_ref().is_none_or(|old| old.model != o.model) {
                cal.offline_trust = OfflineTrust::Trusted;
            }
            cal.offline = Some(o);
            cal.offline_refused = None;
        }
        Some(Err(why)) => {
            cal.offline = None;
            cal.offline_refused = Some(why);
        }
        None => {
            cal.offline = None;
            cal.offline_refused = None;
        }
    }
    cal.audit_rate = c.audit_rate;
    let cuts = window_cuts(&c);
    cal.windows.push_back(Window {
        bins: c.bins,
        cuts,
        requests: counted,
    });
    slide(&mut cal.windows, setup.evidence.window_requests);

    // The drift test: the newest windows against the rest.
    let n = cal.edges.len();
    let recent = recent_count(&cal.windows, setup.evidence.recent_requests);
    let split = cal.windows.len() - recent;
    let (recent_bins, recent_cuts) = sum_windows(cal.windows.iter().skip(split), n);
    let (older_bins, _) = sum_windows(cal.windows.iter().take(split), n);
    let fired = target_of(&setup.policy).and_then(|target| {
        tuner::drift(
            &tuner_bins(&cal.edges, &recent_bins),
            &recent_cuts,
            &tuner_bins(&cal.edges, &older_bins),
            running,
            target,
            &setup.evidence,
        )
    });
    if let Some(why) = &fired {
        // Forget what came before the change: the bound re-certifies from what follows.
        cal.windows.drain(..split);
        cal.drift_alarms += 1;
        cal.last_drift = Some(why.clone());
        cal.offline_trust = OfflineTrust::AfterDrift;
        tracing::warn!(device = %rec.device_id, model = %cal.model, %why, "drift: pushing the conservative threshold");
    }
    // Discredited, but the newest traffic looks like the calibration set again: another
    // change, so the evidence before it goes as after a drift alarm, and the offline
    // certificate is trusted again (the violation test below still checks it).
    let back = fired.is_none()
        && cal.offline_trust == OfflineTrust::AfterDrift
        && cal.offline.as_ref().is_some_and(|o| {
            target_of(&setup.policy).is_some_and(|target| {
                tuner::matches_calibration(
                    &tuner_bins(&cal.edges, &recent_bins),
                    &recent_cuts,
                    o,
                    target,
                    &setup.evidence,
                )
            })
        });
    if back {
        cal.windows.drain(..split);
        cal.offline_trust = OfflineTrust::Trusted;
        tracing::info!(device = %rec.device_id, model = %cal.model, "traffic looks like the model's calibration set again");
    }
    let (bins, cuts) = sum_windows(cal.windows.iter(), n);
    cal.requests = cal.windows.iter().map(|w| w.requests).sum();
    cal.bins = bins;
    cal.cuts = cuts;
    let tb = tuner_bins(&cal.edges, &cal.bins);
    cal.certificate = tune(setup, &tb, &cal.cuts, running, latest);
    let violation = fired.is_none()
        && target_of(&setup.policy).is_some_and(|target| {
            running < tuner::ALWAYS_ESCALATE
                && cal.requests >= setup.limits.min_requests
                && tuner::agreement_upper_bound(&tb, &cal.cuts, running, setup.evidence.drift_delta)
                    < target
        });
    if violation {
        cal.offline_trust = OfflineTrust::AfterViolation;
    } else if let Some(o) = &cal.offline {
        if !cal.certificate.insufficient_evidence && cal.certificate.threshold <= o.threshold {
            cal.offline_trust = OfflineTrust::Trusted;
        }
    }
    let offline = cal
        .offline
        .as_ref()
        .filter(|_| cal.offline_trust == OfflineTrust::Trusted);
    cal.in_force = tuner::in_force(
        &Situation {
            online: &cal.certificate,
            offline,
            running,
            violation,
            drift: fired.as_deref(),
        },
        &setup.limits,
    );
}

/// What the device should run for `model` (a name; `None`: the primary) and why, with the
/// threshold it runs.
pub(super) fn proposal(rec: &DeviceRecord, model: Option<&str>) -> Option<Proposal> {
    let (c, primary) = match model {
        None => (rec.calibration.as_ref()?, true),
        Some(name) if name == model_name(&rec.latest.model) => (rec.calibration.as_ref()?, true),
        Some(name) => (rec.models.get(name)?, false),
    };
    Some(Proposal {
        model: model_name(&c.model).to_string(),
        edge_model: c.model.clone(),
        primary,
        in_force: c.in_force.clone(),
        certificate: c.certificate.clone(),
        offline: c.offline.clone(),
        running: c.running,
    })
}

/// The threshold a device should run for one model, the certificates behind it, and what it
/// runs now.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    /// The model's name (without version).
    pub model: String,
    /// `name@version`, as the evidence named it.
    pub edge_model: String,
    /// Whether it is the device's primary model (whose threshold is the document's top-level
    /// `threshold`; a further model's goes in `models.<name>`).
    pub primary: bool,
    pub in_force: InForce,
    /// The online certificate.
    pub certificate: Certificate,
    pub offline: Option<Offline>,
    pub running: f32,
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
            // The windows below escalate bins 0-2 and answer bin 3 locally.
            thresholds: vec![0.75],
            model: "m@1".into(),
            threshold: 0.9,
        }
    }

    #[test]
    fn a_restored_fleet_is_the_one_stored_and_tunes_on_from_its_windows() {
        let mut f = Fleet::new(10);
        online(&mut f, "a", 1);
        let window = vec![
            BinCounts {
                escalated: 300,
                escalated_labelled: 300,
                escalated_agree: 200,
                ..Default::default()
            },
            BinCounts {
                local: 700,
                audited: 350,
                audited_agree: 350,
                ..Default::default()
            },
        ];
        for seq in 1..=3 {
            telemetry(&mut f, seq, 1000);
            let mut c = calibration("a", window.clone());
            c.seq = seq;
            f.ingest_calibration("a", c, None).expect("calibration");
        }
        f.accept("a", 7, 1, 1).expect("accept");
        assert_eq!(f.commit("a", 7, 1), Some(1));
        let device = f.stored_device("a").expect("device").expect("json");
        let evidence = f.stored_evidence("a").expect("evidence").expect("json");
        assert!(
            !device.contains("\"windows\""),
            "the evidence is stored apart"
        );

        let mut g = Fleet::new(10);
        // Evidence before its device has nowhere to go.
        assert_eq!(g.restore_evidence("a", &evidence).ok(), Some(false));
        g.restore_device("a", &device).expect("device");
        assert_eq!(g.restore_evidence("a", &evidence).ok(), Some(true));
        let shown = |f: &Fleet| serde_json::to_value(f.get("a")).expect("json");
        assert_eq!(shown(&f), shown(&g));
        assert_eq!(f.stream("a"), g.stream("a"));
        assert_eq!(f.status("a"), g.status("a"));
        // A replayed window is still refused, and the next one tunes on the stored windows.
        let mut replay = calibration("a", window.clone());
        replay.seq = 3;
        assert!(g.ingest_calibration("a", replay.clone(), None).is_err());
        assert!(f.ingest_calibration("a", replay, None).is_err());
        for h in [&mut f, &mut g] {
            telemetry(h, 4, 1000);
            let mut c = calibration("a", window.clone());
            c.seq = 4;
            h.ingest_calibration("a", c, None).expect("calibration");
        }
        assert_eq!(shown(&f), shown(&g));
        let requests = g
            .get("a")
            .and_then(|d| d.calibration.as_ref())
            .map(|c| c.requests);
        assert_eq!(requests, Some(4000));
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
        // 1,000 requests a window: the default 20,000-request window keeps the last 20.
        let kept = 20;
        for seq in 1..=(kept + 5) {
            telemetry(&mut f, seq, 1000);
            let mut c = calibration("a", window.clone());
            c.seq = seq;
            f.ingest_calibration("a", c, None).expect("calibration");
        }
        let cal = f
            .get("a")
            .and_then(|d| d.calibration.clone())
            .expect("calibration");
        // Only the last 20 windows count.
        assert_eq!(cal.bins[3].local, 700 * kept);
        assert_eq!(cal.requests, 1000 * kept);
        assert_eq!(cal.cuts, Cuts::Known(vec![0.75]));
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
    fn each_announced_model_has_its_own_evidence_and_proposal() {
        let mut f = Fleet::new(10);
        let served = |model: &str| tierd_protocol::ServedModel {
            model: model.into(),
            calibration: None,
        };
        let status = tierd_protocol::DeviceStatus {
            online: true,
            boot_id: 1,
            reason: String::new(),
            model: None,
            models: vec![served("breast@2")],
            machine: None,
        };
        f.set_status("a", status, 1).expect("status");
        // 2,000 requests answered: 1,000 per model.
        telemetry(&mut f, 1, 2000);
        // `wrong` of the 350 audited local answers disagree with the cloud.
        let window = |wrong: u64| {
            vec![
                BinCounts {
                    escalated: 300,
                    escalated_labelled: 300,
                    escalated_agree: 150,
                    ..Default::default()
                },
                BinCounts {
                    local: 700,
                    audited: 350,
                    audited_agree: 350 - wrong,
                    ..Default::default()
                },
            ]
        };
        // Both ran with the cut at 0.5 (bin 0 escalated, bin 1 local).
        let cal = |wrong| CalibrationReport {
            thresholds: vec![0.5],
            ..calibration("a", window(wrong))
        };
        let primary = cal(20);
        let mut further = cal(0);
        further.model = "breast@2".into();
        further.threshold = 0.6;
        f.ingest_calibration("a", primary, None).expect("primary");
        // Same seq, another model: its own window, not a repeat.
        f.ingest_calibration("a", further.clone(), None)
            .expect("further");
        let rec = f.get("a").expect("record");
        let p = rec.calibration.as_ref().expect("primary evidence");
        let b = rec.models.get("breast").expect("further evidence");
        assert_eq!((p.model.as_str(), b.model.as_str()), ("m@1", "breast@2"));
        assert_eq!((p.running, b.running), (0.9, 0.6));
        assert_eq!(b.requests, 1000);
        // Evidence that differs gives different certificates: the primary's local answers are
        // wrong too often (everything escalates); the further model's are certified.
        assert!(
            b.certificate.threshold == 0.5 && p.certificate.threshold == tuner::ALWAYS_ESCALATE,
            "{:?} vs {:?}",
            b.certificate,
            p.certificate
        );
        let pb = f.proposal("a", Some("breast")).expect("proposal");
        assert!(
            !pb.primary && pb.model == "breast" && pb.running == 0.6,
            "{pb:?}"
        );
        let pp = f.proposal("a", None).expect("proposal");
        assert!(pp.primary && pp.model == "m", "{pp:?}");
        assert_eq!(f.proposal("a", Some("m")), Some(pp));
        // Counted once per model.
        let e = f.ingest_calibration("a", further, None).unwrap_err();
        assert!(e.to_string().contains("already counted"), "{e}");
        // A model the device did not announce opens no evidence.
        let mut ghost = cal(0);
        ghost.model = "ghost@1".into();
        ghost.seq = 2;
        let e = f.ingest_calibration("a", ghost, None).unwrap_err();
        assert!(
            matches!(e, FleetError::UnannouncedModel { .. }) && e.to_string().contains("breast@2"),
            "{e}"
        );
        // The requests of all models together cannot exceed what the telemetry answered.
        let mut more = cal(0);
        more.model = "breast@2".into();
        more.seq = 2;
        more.bins[1].local = 1000;
        let e = f.ingest_calibration("a", more, None).unwrap_err();
        assert!(e.to_string().contains("telemetry answered 2000"), "{e}");
        assert_eq!(f.get("a").map(|d| d.models.len()), Some(1));
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

    fn offline_cert() -> ModelCalibration {
        ModelCalibration {
            model: "edge@2".into(),
            threshold: 0.9,
            target: 0.99,
            delta: 0.05,
            samples: 20_000,
            disagreements: 129,
            agreement_lower_bound: 1.0 - tuner::clopper_pearson_upper(129, 20_000, 0.05),
            escalation_rate: 0.1,
            reference: "cloud@1".into(),
        }
    }

    /// 1,000 requests at threshold 0.9 over bins [0, 0.5), [0.5, 0.9), [0.9, 1]: `low` of
    /// them below 0.9 (escalated, four in five agreeing), the rest local with 2 % audited,
    /// `wrong` of those audits disagreeing.
    fn window_at_09(seq: u64, low: u64, wrong: u64) -> CalibrationReport {
        let local = 1000 - low;
        let audited = local / 50;
        let esc = |n: u64| BinCounts {
            escalated: n,
            escalated_labelled: n,
            escalated_agree: n * 4 / 5,
            ..Default::default()
        };
        CalibrationReport {
            device_id: "a".into(),
            boot_id: 1,
            seq,
            signal: Signal::MaxProb,
            edges: vec![0.0, 0.5, 0.9],
            bins: vec![
                esc(low / 2),
                esc(low - low / 2),
                BinCounts {
                    local,
                    audited,
                    audited_agree: audited - wrong,
                    ..Default::default()
                },
            ],
            audit_rate: 0.02,
            thresholds: vec![0.9],
            model: "m@1".into(),
            threshold: 0.9,
        }
    }

    #[test]
    fn drift_pushes_the_conservative_threshold_and_a_return_restores_the_offline_one() {
        let mut f = Fleet::new(10).with_reference("cloud@1");
        let status = tierd_protocol::DeviceStatus {
            online: true,
            boot_id: 1,
            reason: String::new(),
            model: Some(offline_cert()),
            models: Vec::new(),
            machine: None,
        };
        f.set_status("a", status, 1).expect("status");
        let mut seq = 0;
        let mut file = |f: &mut Fleet, low, wrong| {
            seq += 1;
            telemetry(f, seq, 1000);
            f.ingest_calibration("a", window_at_09(seq, low, wrong), None)
                .expect("plausible");
            f.proposal("a", None).expect("proposal")
        };
        // Clean traffic like the calibration set: the offline certificate is in force, not
        // "escalate everything" on thin online evidence.
        for _ in 0..3 {
            let p = file(&mut f, 100, 0);
            assert_eq!(
                (p.in_force.basis, p.in_force.threshold),
                (Basis::Offline, 0.9)
            );
        }
        // Half the traffic below 0.9: drift, at once.
        let p = file(&mut f, 500, 0);
        assert_eq!(p.in_force.basis, Basis::Drift, "{p:?}");
        assert_eq!(p.in_force.threshold, tuner::ALWAYS_ESCALATE);
        let cal = f.get("a").and_then(|d| d.calibration.clone()).expect("cal");
        assert_eq!(cal.drift_alarms, 1);
        assert_eq!(cal.requests, 1000, "evidence cut back to the newest window");
        assert_eq!(cal.offline_trust, OfflineTrust::AfterDrift);
        // Still drifted: the offline certificate stays discredited.
        let p = file(&mut f, 500, 0);
        assert_ne!(p.in_force.basis, Basis::Offline, "{p:?}");
        // Back to the calibration set's shape: trusted again, older evidence forgotten.
        let p = file(&mut f, 100, 0);
        assert_eq!(
            (p.in_force.basis, p.in_force.threshold),
            (Basis::Offline, 0.9),
            "{p:?}"
        );
        let cal = f.get("a").and_then(|d| d.calibration.clone()).expect("cal");
        assert_eq!(cal.requests, 1000);
        // A forged certificate (bound not following from its counts) is refused, with why.
        let mut forged = offline_cert();
        forged.agreement_lower_bound = 0.9999;
        forged.disagreements = 400;
        let status = tierd_protocol::DeviceStatus {
            online: true,
            boot_id: 1,
            reason: String::new(),
            model: Some(forged),
            models: Vec::new(),
            machine: None,
        };
        f.set_status("a", status, 2).expect("status");
        let p = file(&mut f, 100, 0);
        assert!(p.offline.is_none());
        let cal = f.get("a").and_then(|d| d.calibration.clone()).expect("cal");
        assert!(
            cal.offline_refused
                .as_deref()
                .is_some_and(|w| w.contains("does not follow")),
            "{cal:?}"
        );
    }
}

//! One replay: the stream goes through the cascade rule, the agent's evidence counting, and
//! the relay's own `Fleet` (evidence window, drift test, tuner, the rule for the threshold in
//! force) and `Control` (push rules) — the daemons' code, fed the reports an agent would send
//! every `report_every` requests, on a simulated clock. Audits are drawn from a seeded
//! generator. Pure over precomputed model outputs, so hundreds of seeded replays take seconds.

use cloud_relay::control::Control;
use cloud_relay::fleet::Fleet;
use cloud_relay::tuner::{Certificate, InForce, PushRules, Setup};
use edge_agent::cascade;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use tierd_protocol::{
    BinCounts, CalibrationReport, DeviceContext, DeviceStatus, EnergyReport, ModelCalibration,
    Settings, Signal, TelemetryReport, TierCounts, MAX_THRESHOLDS_IN_FORCE,
};

/// One request with both models' answers, computed once.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub confidence: f32,
    pub edge_top1: u8,
    pub cloud_top1: u8,
    pub label: u8,
    pub phase: usize,
}

impl Item {
    pub fn agree(&self) -> bool {
        self.edge_top1 == self.cloud_top1
    }
}

/// The agent's bin edges, so the replay bins exactly as the daemons do.
pub use edge_agent::evidence::{bin_of, EDGES};

#[derive(Debug, Clone)]
pub struct Config {
    /// The relay's tuning (policy, limits, evidence window, drift test).
    pub setup: Setup,
    pub rules: PushRules,
    pub audit_rate: f64,
    /// The threshold the device starts at (the agent's: `agent.toml`, else the manifest's).
    pub initial_threshold: f32,
    /// The offline certificate the device's status announces.
    pub offline: Option<ModelCalibration>,
    /// Requests per telemetry report (request rate × telemetry interval).
    pub report_every: usize,
    /// Simulated requests per second (the relay's push clock).
    pub rate: f64,
    /// Requests per printed row.
    pub row_every: usize,
}

/// What one printed row saw.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub start: usize,
    pub phase: usize,
    pub threshold: f32,
    pub requests: usize,
    pub agreement: f64,
    pub escalation_rate: f64,
    pub oracle_rate: f64,
    pub accuracy: f64,
    pub audits: usize,
}

/// The threshold in force after a report, the online certificate beside it, and the truth.
#[derive(Debug, Clone)]
pub struct Issued {
    pub certificate: Certificate,
    pub in_force: InForce,
    /// Agreement the online certificate's threshold has over the whole current phase (the
    /// population its evidence was drawn from).
    pub true_agreement: f64,
    /// The same for the threshold in force.
    pub in_force_agreement: f64,
    /// The evidence window lay entirely inside one phase (exchangeable), so the guarantee
    /// applies; false while drift is washing through the window.
    pub clean: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub rows: Vec<Row>,
    pub issued: Vec<Issued>,
    pub escalations: usize,
    pub audits: usize,
    pub pushes: usize,
    pub drift_alarms: u64,
}

/// Agreement over all `items` if answered at threshold `t`.
pub fn agreement_at(items: &[Item], t: f32) -> f64 {
    if items.is_empty() {
        return 1.0;
    }
    let wrong = items
        .iter()
        .filter(|i| !cascade::should_escalate(i.confidence, t) && !i.agree())
        .count();
    1.0 - wrong as f64 / items.len() as f64
}

const DEVICE: &str = "replay-01";
const BOOT: u64 = 1_000;

/// The telemetry report an agent would send: only what the fleet's checks read is real.
fn telemetry(
    seq: u64,
    now_ms: u64,
    threshold: f32,
    window: TierCounts,
    totals: TierCounts,
) -> TelemetryReport {
    TelemetryReport {
        device_id: DEVICE.into(),
        boot_id: BOOT,
        seq,
        window_start_ms: now_ms.saturating_sub(1),
        window_end_ms: now_ms,
        model: "replay".into(),
        threshold,
        signal: Signal::MaxProb,
        window,
        totals,
        fallbacks: Default::default(),
        latency: Vec::new(),
        energy: EnergyReport {
            meter: "none".into(),
            estimated: true,
            window_joules: None,
            attributed_joules: None,
            joules_per_inference: None,
            radio_joules_per_escalation: None,
            radio_joules: 0.0,
            total_joules: 0.0,
            bytes_out: 0,
            bytes_in: 0,
            error: None,
        },
        device: DeviceContext {
            cpu_percent: 0.0,
            agent_cpu_seconds: 0.0,
            cpu_cores: 1,
            memory_used_bytes: 0,
            memory_total_bytes: 1,
            temperature_c: None,
            temperature_sensor: None,
        },
        spool: Default::default(),
        config_version: 0,
    }
}

/// Replays `phases` (each a population of items) in order. `seed` shuffles each phase and
/// draws the audits; seed 0 keeps the file order.
pub fn run(phases: &[Vec<Item>], cfg: &Config, seed: u64) -> Outcome {
    let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut stream: Vec<Item> = Vec::new();
    for p in phases {
        let mut p = p.clone();
        if seed != 0 {
            p.shuffle(&mut rng);
        }
        stream.extend(p);
    }
    let ms = |i: usize| 1_000_000 + (i as f64 * 1000.0 / cfg.rate) as u64;
    let mut fleet = Fleet::new(1).with_tuner(cfg.setup);
    let mut control = Control::new(
        true,
        cfg.rules,
        Settings::default(),
        Default::default(),
        Default::default(),
        1,
    );
    let status = DeviceStatus {
        online: true,
        boot_id: BOOT,
        reason: String::new(),
        model: cfg.offline.clone(),
        models: Vec::new(),
        machine: None,
    };
    // Simulated time starts well after the boot: the fleet refuses boots from the future.
    if fleet.set_status(DEVICE, status, ms(0)).is_err() {
        return Outcome::default();
    }
    let mut threshold = cfg.initial_threshold;
    let mut out = Outcome::default();
    let mut bins = vec![BinCounts::default(); EDGES.len()];
    let mut thresholds: Vec<f32> = Vec::new();
    let (mut window, mut totals) = (TierCounts::default(), TierCounts::default());
    let mut seq = 0;
    let mut row = Row::default();
    let (mut row_agree, mut row_esc, mut row_oracle, mut row_correct) = (0, 0, 0, 0);
    for (i, item) in stream.iter().enumerate() {
        if row.requests == 0 {
            row = Row {
                start: i,
                phase: item.phase,
                threshold,
                ..Row::default()
            };
        }
        let escalated = cascade::should_escalate(item.confidence, threshold);
        let audited = !escalated && rng.random_bool(cfg.audit_rate);
        let answer = if escalated {
            item.cloud_top1
        } else {
            item.edge_top1
        };
        row.requests += 1;
        row_agree += usize::from(answer == item.cloud_top1);
        row_esc += usize::from(escalated);
        row_oracle += usize::from(!item.agree());
        row_correct += usize::from(answer == item.label);
        row.audits += usize::from(audited);
        out.escalations += usize::from(escalated);
        out.audits += usize::from(audited);

        // What the agent counts (`edge_agent::evidence`).
        let agree = u64::from(item.agree());
        let b = &mut bins[bin_of(item.confidence)];
        if escalated {
            b.escalated += 1;
            b.escalated_labelled += 1;
            b.escalated_agree += agree;
            window.cloud += 1;
        } else {
            b.local += 1;
            b.audited += u64::from(audited);
            b.audited_agree += u64::from(audited) * agree;
            window.edge += 1;
        }
        if !thresholds.contains(&threshold) && thresholds.len() < MAX_THRESHOLDS_IN_FORCE {
            thresholds.push(threshold);
        }

        if (i + 1) % cfg.report_every == 0 {
            seq += 1;
            let now = ms(i + 1);
            totals = totals.plus(window);
            let report = telemetry(seq, now, threshold, window, totals);
            let c = CalibrationReport {
                device_id: DEVICE.into(),
                boot_id: BOOT,
                seq,
                signal: Signal::MaxProb,
                edges: EDGES.to_vec(),
                bins: std::mem::replace(&mut bins, vec![BinCounts::default(); EDGES.len()]),
                audit_rate: cfg.audit_rate as f32,
                thresholds: std::mem::take(&mut thresholds),
                model: report.model.clone(),
                threshold,
            };
            window = TierCounts::default();
            let filed = fleet.ingest(DEVICE, report, now).is_ok()
                && fleet
                    .ingest_calibration(DEVICE, c, Some(cfg.audit_rate as f32))
                    .is_ok();
            if let (true, Some(p)) = (filed, fleet.proposal(DEVICE, None)) {
                let requests = fleet
                    .get(DEVICE)
                    .and_then(|d| d.calibration.as_ref())
                    .map_or(0, |c| c.requests as usize);
                let from = (i + 1).saturating_sub(requests);
                let phase = item.phase;
                let clean = stream[from..=i].iter().all(|e| e.phase == phase);
                out.issued.push(Issued {
                    true_agreement: agreement_at(&phases[phase], p.certificate.threshold),
                    in_force_agreement: agreement_at(&phases[phase], p.in_force.threshold),
                    certificate: p.certificate.clone(),
                    in_force: p.in_force.clone(),
                    clean,
                });
                if let Some(doc) = control.on_proposal(DEVICE, &p, now) {
                    if let Some(t) = doc.settings.threshold {
                        threshold = t;
                        out.pushes += 1;
                    }
                }
            }
        }
        if row.requests == cfg.row_every || i + 1 == stream.len() {
            let n = row.requests as f64;
            row.agreement = row_agree as f64 / n;
            row.escalation_rate = row_esc as f64 / n;
            row.oracle_rate = row_oracle as f64 / n;
            row.accuracy = row_correct as f64 / n;
            out.rows.push(std::mem::take(&mut row));
            (row_agree, row_esc, row_oracle, row_correct) = (0, 0, 0, 0);
        }
    }
    out.drift_alarms = fleet
        .get(DEVICE)
        .and_then(|d| d.calibration.as_ref())
        .map_or(0, |c| c.drift_alarms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(n: usize, phase: usize) -> Vec<Item> {
        // Confidence spread evenly; the edge is wrong on every 5th item below 0.8 only.
        (0..n)
            .map(|i| {
                let confidence = (i % 100) as f32 / 100.0;
                let wrong = confidence < 0.8 && i % 5 == 0;
                Item {
                    confidence,
                    edge_top1: if wrong { 1 } else { 0 },
                    cloud_top1: 0,
                    label: 0,
                    phase,
                }
            })
            .collect()
    }

    fn cfg() -> Config {
        let mut setup = Setup::default();
        setup.evidence.window_requests = 5000;
        Config {
            setup,
            rules: PushRules {
                hysteresis: 0.01,
                min_interval_ms: 0,
            },
            audit_rate: 0.05,
            initial_threshold: 0.9,
            offline: None,
            report_every: 500,
            rate: 100.0,
            row_every: 1000,
        }
    }

    #[test]
    fn bins_cover_zero_to_one() {
        assert_eq!(bin_of(0.0), 0);
        assert_eq!(bin_of(0.95), 12);
        assert_eq!(bin_of(1.0), EDGES.len() - 1);
        assert_eq!(bin_of(0.9995), EDGES.len() - 1);
    }

    #[test]
    fn tuner_finds_the_safe_region_and_keeps_the_target() {
        // Every local answer audited and a window as long as the stream: the tuner settles on
        // 0.8, the lowest threshold whose region never disagrees (0.75 would sit at 0.99).
        let phases = vec![synthetic(20_000, 0)];
        let mut c = Config {
            audit_rate: 1.0,
            ..cfg()
        };
        c.setup.evidence.window_requests = 20_000;
        let out = run(&phases, &c, 7);
        let last = out.issued.last().expect("certificates issued");
        assert!(
            (last.certificate.threshold - 0.8).abs() < 1e-6,
            "{:?}",
            last.certificate
        );
        assert!(last.true_agreement >= 0.99, "{last:?}");
        assert!(
            out.rows.iter().all(|r| r.agreement >= 0.98),
            "{:?}",
            out.rows
        );
    }

    #[test]
    fn thin_audits_stay_conservative_never_wrong() {
        // 2 % audits cannot certify the local region for long: the threshold goes up rather
        // than below the target. No clean certificate may be violated on any seed.
        let phases = vec![synthetic(20_000, 0)];
        let c = Config {
            audit_rate: 0.02,
            ..cfg()
        };
        for seed in 1..=20 {
            let out = run(&phases, &c, seed);
            for i in out.issued.iter().filter(|i| i.clean) {
                assert!(i.true_agreement >= 0.99, "seed {seed}: {i:?}");
            }
        }
    }

    #[test]
    fn replays_are_reproducible_per_seed() {
        let phases = vec![synthetic(5_000, 0)];
        let a = run(&phases, &cfg(), 3);
        let b = run(&phases, &cfg(), 3);
        assert_eq!(a.escalations, b.escalations);
        assert_eq!(a.audits, b.audits);
        assert!(a.audits > 0);
    }
}

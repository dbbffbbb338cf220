//! What one virtual device says, built the way `edge-agent` builds it, so the relay believes
//! and files every record (see `cloud-relay/src/fleet/mod.rs`, "What is believed"):
//!
//! - its retained [`DeviceStatus`] announces the boot before any record of it (the agent's
//!   online status on connect); `boot_id` is Unix ms at the simulator's start, never ahead of
//!   the relay's clock;
//! - [`TelemetryReport`]s number their windows 1, 2, ... per boot, and their window counts add
//!   up to their totals;
//! - a [`CalibrationReport`] every `calibration_every` reports covers exactly the requests of
//!   the windows since the previous one (so a boot's windows never count more requests than its
//!   telemetry answered), carries that report's `seq` (increasing), the agent's 20 bin edges,
//!   and per bin no more labels than requests, no more agreements than labels, and audits at
//!   the audit rate in force (well inside `max_plausible_audits`);
//! - model ids are `name@version`, as the agent sends them;
//! - a config document is answered with a [`ConfigAck`] by the agent's rules (newer
//!   `(epoch, version)` and this device's id, else rejected; the same document again: no ack).
//!
//! The traffic behind the counts is synthetic: a fixed confidence histogram ([`MASS`]) with a
//! per-bin agreement rate ([`AGREE`]), drawn with stochastic rounding from a per-device
//! generator. The tuner sees a plausible, stationary device.

use tierd_protocol::{
    BinCounts, CalibrationReport, ConfigAck, ConfigDocument, DeviceContext, DeviceStatus,
    EnergyReport, FallbackCounts, LatencySeries, LatencySummary, ModelCalibration, Signal,
    SpoolCounts, TelemetryReport, TierCounts, MAX_THRESHOLDS_IN_FORCE,
};

/// The agent's lower bin edges (`agent/src/evidence.rs`): the tuner proposes thresholds on them.
pub const EDGES: [f32; 20] = [
    0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99,
    0.995, 0.998, 0.999,
];

/// Share of requests whose confidence falls in each bin: 10 % below 0.9, most of the rest in
/// the top bin (roughly `digits-edge` on its evaluation stream).
pub const MASS: [f64; 20] = [
    0.002, 0.004, 0.006, 0.008, 0.010, 0.012, 0.012, 0.014, 0.016, 0.016, 0.020, 0.025, 0.025,
    0.020, 0.020, 0.030, 0.040, 0.050, 0.070, 0.600,
];

/// How often the edge agrees with the cloud in each bin: above 0.9, 99.42 % overall, about
/// what `digits-edge`'s offline certificate measured (129 of 20,000 disagree: 99.36 %), so the
/// relay's drift test sees traffic like the calibration set's (a worse device trips it and is
/// pushed to always escalate: not a steady state).
pub const AGREE: [f64; 20] = [
    0.30, 0.40, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.95, 0.96, 0.97, 0.975, 0.98,
    0.985, 0.99, 0.995, 0.998, 0.9995,
];

/// Share of escalations that fall back to the edge (time out) instead of a cloud answer.
const FALLBACK_SHARE: f64 = 0.02;

/// The default edge model: its manifest's offline certificate is announced in the status.
pub const DEFAULT_EDGE_MODEL: &str = "digits-edge@2.0.0";

/// `models/edge/digits-edge.toml`'s `[calibration]`, as the agent announces it.
fn digits_edge_certificate(model: &str) -> Option<ModelCalibration> {
    (model == DEFAULT_EDGE_MODEL).then(|| ModelCalibration {
        model: model.to_string(),
        threshold: 0.9,
        target: 0.99,
        delta: 0.05,
        samples: 20_000,
        disagreements: 129,
        agreement_lower_bound: 0.992538529541065,
        escalation_rate: 0.0998,
        reference: "digits-cloud@1.0.0".into(),
    })
}

/// xorshift64*: small, fast, deterministic per seed. Not for anything but synthetic counts.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Spread nearby seeds (device indices) apart; never 0.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `x` rounded up with probability equal to its fraction: unbiased, never negative.
    pub fn round(&mut self, x: f64) -> u64 {
        if !x.is_finite() || x <= 0.0 {
            return 0;
        }
        let floor = x.floor();
        floor as u64 + u64::from(self.unit() < x - floor)
    }
}

/// The settings a device runs with: its `agent.toml` defaults, then the config document in
/// force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub threshold: f32,
    pub signal: Signal,
    pub audit_rate: f64,
    pub config_version: u64,
    pub epoch: u64,
}

impl Default for Policy {
    /// The agent's defaults with `digits-edge`'s certified threshold.
    fn default() -> Self {
        Policy {
            threshold: 0.9,
            signal: Signal::MaxProb,
            audit_rate: 0.02,
            config_version: 0,
            epoch: 0,
        }
    }
}

/// One window's synthetic traffic: per-bin evidence and the tier counts it implies.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub bins: Vec<BinCounts>,
    pub tiers: TierCounts,
    pub fallbacks: FallbackCounts,
}

/// About `requests` requests (stochastically rounded per bin) decided under `policy`: a bin is
/// answered locally when its lower edge is at or above the threshold (the tuner's thresholds
/// sit on edges), else escalated.
pub fn window(rng: &mut Rng, requests: u64, policy: &Policy) -> Window {
    let mut bins = vec![BinCounts::default(); EDGES.len()];
    let mut tiers = TierCounts::default();
    let audit_rate = policy.audit_rate.clamp(0.0, 1.0);
    for (i, b) in bins.iter_mut().enumerate() {
        let n = rng.round(requests as f64 * MASS[i]);
        if EDGES[i] >= policy.threshold {
            let audited = rng.round(n as f64 * audit_rate).min(n);
            *b = BinCounts {
                local: n,
                audited,
                audited_agree: rng.round(audited as f64 * AGREE[i]).min(audited),
                ..Default::default()
            };
            tiers.edge += n;
            tiers.audits += audited;
        } else {
            let fallback = rng.round(n as f64 * FALLBACK_SHARE).min(n);
            let labelled = n - fallback;
            *b = BinCounts {
                escalated: n,
                escalated_labelled: labelled,
                escalated_agree: rng.round(labelled as f64 * AGREE[i]).min(labelled),
                ..Default::default()
            };
            tiers.cloud += labelled;
            tiers.edge_fallback += fallback;
        }
    }
    Window {
        bins,
        tiers,
        fallbacks: FallbackCounts {
            timeout: tiers.edge_fallback,
            ..Default::default()
        },
    }
}

/// What a device has said so far in its boot, and the settings it runs.
#[derive(Debug, Clone)]
pub struct DeviceRecords {
    pub device_id: String,
    pub boot_id: u64,
    /// `name@version` of the edge model.
    pub model: String,
    pub policy: Policy,
    /// The config document in force (the agent keeps it to recognise a resend).
    doc: Option<ConfigDocument>,
    seq: u64,
    window_start_ms: u64,
    totals: TierCounts,
    total_joules: f64,
    /// Evidence of the windows since the last calibration report.
    bins: Vec<BinCounts>,
    thresholds: Vec<f32>,
    thresholds_overflow: bool,
}

impl DeviceRecords {
    pub fn new(device_id: String, boot_id: u64, model: String, policy: Policy) -> Self {
        DeviceRecords {
            device_id,
            boot_id,
            model,
            policy,
            doc: None,
            seq: 0,
            window_start_ms: boot_id,
            totals: TierCounts::default(),
            total_joules: 0.0,
            bins: vec![BinCounts::default(); EDGES.len()],
            thresholds: Vec::new(),
            thresholds_overflow: false,
        }
    }

    /// The retained status: online (on connect, announcing the boot and the model's offline
    /// certificate) or offline (`stopped`, published before a clean disconnect).
    pub fn status(&self, online: bool) -> DeviceStatus {
        DeviceStatus {
            online,
            boot_id: self.boot_id,
            reason: if online {
                String::new()
            } else {
                "stopped".into()
            },
            model: if online {
                digits_edge_certificate(&self.model)
            } else {
                None
            },
            models: Vec::new(),
            machine: None,
        }
    }

    /// The next window, ending at `now_ms`, with about `requests` requests: its telemetry
    /// report, and every `calibration_every`-th window the calibration report covering the
    /// windows since the previous one (same `seq` as the report, sent after it).
    pub fn next_window(
        &mut self,
        rng: &mut Rng,
        requests: u64,
        now_ms: u64,
        calibration_every: u64,
        spool: SpoolCounts,
    ) -> (TelemetryReport, Option<CalibrationReport>) {
        self.seq += 1;
        let w = window(rng, requests, &self.policy);
        self.totals = self.totals.plus(w.tiers);
        for (acc, b) in self.bins.iter_mut().zip(&w.bins) {
            *acc = acc.plus(*b);
        }
        self.note_threshold(self.policy.threshold);
        let end_ms = now_ms.max(self.window_start_ms);
        let report = self.report(&w, end_ms, spool);
        self.window_start_ms = end_ms;
        let calibration = (calibration_every > 0 && self.seq.is_multiple_of(calibration_every))
            .then(|| self.take_calibration());
        (report, calibration)
    }

    fn note_threshold(&mut self, t: f32) {
        if self.thresholds_overflow || self.thresholds.contains(&t) {
            return;
        }
        if self.thresholds.len() < MAX_THRESHOLDS_IN_FORCE {
            self.thresholds.push(t);
        } else {
            self.thresholds_overflow = true;
        }
    }

    fn take_calibration(&mut self) -> CalibrationReport {
        let bins = std::mem::replace(&mut self.bins, vec![BinCounts::default(); EDGES.len()]);
        // As the agent: more distinct thresholds than the protocol lists -> every bin edge.
        let thresholds = if self.thresholds_overflow {
            EDGES.to_vec()
        } else {
            std::mem::take(&mut self.thresholds)
        };
        self.thresholds.clear();
        self.thresholds_overflow = false;
        CalibrationReport {
            device_id: self.device_id.clone(),
            boot_id: self.boot_id,
            seq: self.seq,
            signal: self.policy.signal,
            edges: EDGES.to_vec(),
            bins,
            audit_rate: self.policy.audit_rate as f32,
            thresholds,
            model: self.model.clone(),
            threshold: self.policy.threshold,
        }
    }

    fn report(&mut self, w: &Window, end_ms: u64, spool: SpoolCounts) -> TelemetryReport {
        let window_s = end_ms.saturating_sub(self.window_start_ms) as f64 / 1000.0;
        let t = w.tiers;
        let answered = t.answered();
        let escalated = t.escalated();
        // A Raspberry Pi 4 at ~2.7 W; about a tenth of it attributed to the agent's work.
        let window_joules = 2.7 * window_s;
        let attributed = 0.1 * window_joules;
        let radio_per_escalation = 0.0002;
        let radio = radio_per_escalation * escalated as f64;
        self.total_joules += attributed + radio;
        let summary = |series, count: u64, p50_us: u64| LatencySummary {
            series,
            count,
            p50_us: if count > 0 { p50_us } else { 0 },
            p95_us: if count > 0 { p50_us * 3 } else { 0 },
            p99_us: if count > 0 { p50_us * 6 } else { 0 },
            max_us: if count > 0 { p50_us * 20 } else { 0 },
        };
        TelemetryReport {
            device_id: self.device_id.clone(),
            boot_id: self.boot_id,
            seq: self.seq,
            window_start_ms: self.window_start_ms,
            window_end_ms: end_ms,
            model: self.model.clone(),
            threshold: self.policy.threshold,
            signal: self.policy.signal,
            window: t,
            totals: self.totals,
            fallbacks: w.fallbacks,
            latency: vec![
                summary(LatencySeries::PathEdge, t.edge, 150),
                summary(LatencySeries::PathCloud, t.cloud, 2_500),
                summary(LatencySeries::PathEdgeFallback, t.edge_fallback, 250_000),
                summary(LatencySeries::StageQueue, answered, 20),
                summary(LatencySeries::StageForward, answered, 90),
                summary(LatencySeries::StageEscalation, escalated, 2_200),
            ],
            energy: EnergyReport {
                meter: "estimate:rpi4".into(),
                estimated: true,
                window_joules: Some(window_joules),
                attributed_joules: Some(attributed),
                joules_per_inference: (answered > 0).then(|| attributed / answered as f64),
                radio_joules_per_escalation: (escalated > 0).then_some(radio_per_escalation),
                radio_joules: radio,
                total_joules: self.total_joules,
                bytes_out: escalated * 110,
                bytes_in: escalated * 60,
                error: None,
            },
            device: DeviceContext {
                cpu_percent: 12.5,
                agent_cpu_seconds: 0.02 * window_s,
                cpu_cores: 4,
                memory_used_bytes: 900 << 20,
                memory_total_bytes: 4 << 30,
                temperature_c: Some(55.0),
                temperature_sensor: Some("cpu_thermal".into()),
            },
            spool,
            config_version: self.policy.config_version,
        }
    }

    /// A config document arrived on the device's `config` topic (retained). Returns the ack
    /// to spool, or `None` when there is nothing to answer (an empty payload clears the
    /// retained message; the document in force arriving again is no news, as for the agent).
    ///
    /// The envelope's Ed25519 signature is NOT verified: the simulator pins no key (the relay
    /// under test signs with a key it may have just generated) and the cost being measured is
    /// the relay's, not the device's. A real agent refuses an unsigned or foreign document;
    /// here only the envelope's shape and the document's own checks apply.
    pub fn apply_config(&mut self, payload: &[u8]) -> Option<ConfigAck> {
        if payload.is_empty() {
            return None;
        }
        let in_force = self.policy.config_version;
        let rejected = |version: u64, reason: String| ConfigAck {
            version,
            applied: false,
            reason,
            in_force,
        };
        let doc = match envelope_document(payload) {
            Ok(d) => d,
            Err(reason) => return Some(rejected(0, reason)),
        };
        if self.doc.as_ref() == Some(&doc) {
            return None;
        }
        if let Err(e) = doc.check(&self.device_id, self.policy.epoch, in_force) {
            return Some(rejected(doc.version, e.to_string()));
        }
        let name = self.model.split('@').next().unwrap_or_default();
        let s = &doc.settings;
        let own = s.models.get(name);
        let p = &mut self.policy;
        p.threshold = own
            .and_then(|m| m.threshold)
            .or(s.threshold)
            .unwrap_or(p.threshold);
        p.signal = own.and_then(|m| m.signal).or(s.signal).unwrap_or(p.signal);
        p.audit_rate = s.for_model(name).audit_rate.unwrap_or(p.audit_rate);
        p.config_version = doc.version;
        p.epoch = doc.epoch;
        // `telemetry_interval_s` and `escalation_timeout_ms` are not followed: the simulator's
        // command line sets the rates being measured.
        let version = doc.version;
        self.doc = Some(doc);
        Some(ConfigAck {
            version,
            applied: true,
            reason: String::new(),
            in_force: version,
        })
    }
}

/// The document inside a signed envelope (`{"alg","key_id","doc","sig"}`), parsed and
/// range-checked; the signature is not checked (see [`DeviceRecords::apply_config`]).
fn envelope_document(payload: &[u8]) -> Result<ConfigDocument, String> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("config envelope is not JSON: {e}"))?;
    let doc = v
        .get("doc")
        .and_then(|d| d.as_str())
        .ok_or("config document is not signed (no envelope)")?;
    ConfigDocument::from_json(doc.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierd_protocol::{decode, encode};

    /// The relay's `max_plausible_audits` (cloud-relay/src/fleet/evidence.rs).
    fn max_plausible_audits(local: u64, rate: f32) -> u64 {
        let mean = local as f64 * f64::from(rate.clamp(0.0, 1.0));
        (mean + 6.0 * mean.sqrt() + 10.0).ceil() as u64
    }

    fn device() -> DeviceRecords {
        DeviceRecords::new(
            "sim-00001".into(),
            1_800_000_000_000,
            DEFAULT_EDGE_MODEL.into(),
            Policy::default(),
        )
    }

    #[test]
    fn distributions_are_shares() {
        assert!((MASS.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(AGREE.iter().all(|a| (0.0..=1.0).contains(a)));
        assert!(EDGES.windows(2).all(|w| w[0] < w[1]));
        let below: f64 = (0..EDGES.len())
            .filter(|&i| EDGES[i] < 0.9)
            .map(|i| MASS[i])
            .sum();
        assert!((below - 0.1).abs() < 1e-9, "{below}");
        let above: f64 = (0..EDGES.len())
            .filter(|&i| EDGES[i] >= 0.9)
            .map(|i| MASS[i] * AGREE[i])
            .sum::<f64>()
            / 0.9;
        assert!(above > 1.0 - 129.0 / 20_000.0, "{above}");
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_bounded() {
        let mut r = Rng::new(7);
        let n = 100_000;
        let sum: u64 = (0..n).map(|_| r.round(0.3)).sum();
        assert!((sum as f64 / n as f64 - 0.3).abs() < 0.01, "{sum}");
        assert_eq!(r.round(-1.0), 0);
        assert_eq!(r.round(f64::NAN), 0);
        assert_eq!(r.round(2.0), 2);
    }

    /// Every rule the relay applies to a boot's records (fleet/mod.rs, fleet/evidence.rs,
    /// reasoned from their code), checked over a long run with config changes in between.
    #[test]
    fn records_pass_the_relays_checks() {
        let mut d = device();
        let mut rng = Rng::new(1);
        let status = d.status(true);
        assert!(status.online);
        assert_eq!(status.boot_id, d.boot_id);
        assert_eq!(
            status.model.as_ref().map(|m| m.model.as_str()),
            Some(d.model.as_str())
        );
        let (mut counted, mut last_cal_seq, mut last_seq) = (0u64, 0u64, 0u64);
        let (mut sliding_local, mut sliding_audited) = (0u64, 0u64);
        let mut window_sums = TierCounts::default();
        for i in 1..=120u64 {
            if i == 40 {
                // A tuned threshold arrives mid-run.
                let doc = r#"{"version":5,"device_id":"sim-00001","settings":{"threshold":0.85}}"#;
                let env = serde_json::json!({"alg":"ed25519","key_id":"0","doc":doc,"sig":"00"});
                let ack = d.apply_config(env.to_string().as_bytes()).expect("ack");
                assert!(ack.applied && ack.in_force == 5, "{ack:?}");
            }
            let now = d.boot_id + i * 10_000;
            let (r, cal) = d.next_window(&mut rng, 100 + i, now, 6, SpoolCounts::default());
            // Wire round trip, as the relay decodes it.
            let r = decode::<TelemetryReport>(&encode(&r).expect("encode")).expect("decode");
            assert_eq!(r.device_id, d.device_id);
            assert_eq!(r.boot_id, d.boot_id);
            assert_eq!(r.seq, last_seq + 1, "contiguous seqs");
            last_seq = r.seq;
            assert!(r.window_end_ms >= r.window_start_ms);
            assert!(r.model.contains('@'));
            window_sums = window_sums.plus(r.window);
            assert_eq!(window_sums, r.totals, "windows sum to the totals");
            assert_eq!(r.latency.len(), LatencySeries::ALL.len());
            let Some(c) = cal else {
                assert!(i % 6 != 0);
                continue;
            };
            let c = decode::<CalibrationReport>(&encode(&c).expect("encode")).expect("decode");
            assert_eq!(
                (c.device_id.as_str(), c.boot_id),
                (r.device_id.as_str(), r.boot_id)
            );
            assert!(c.seq > last_cal_seq, "a window is counted once, in order");
            last_cal_seq = c.seq;
            assert_eq!(c.model, r.model);
            // well_formed
            assert_eq!(c.edges.len(), c.bins.len());
            assert!(c.edges.windows(2).all(|w| w[0] < w[1]));
            assert!(c.edges.iter().all(|e| (0.0..=1.0).contains(e)));
            assert!((0.0..=1.01).contains(&c.threshold));
            assert!(c.thresholds.len() <= MAX_THRESHOLDS_IN_FORCE);
            for b in &c.bins {
                assert!(b.escalated_labelled <= b.escalated);
                assert!(b.escalated_agree <= b.escalated_labelled);
                assert!(b.audited_agree <= b.audited);
                assert!(b.audited <= b.local);
            }
            // The boot's windows count no more requests than its telemetry answered.
            counted += c.bins.iter().map(|b| b.escalated + b.local).sum::<u64>();
            assert!(
                counted <= r.totals.answered(),
                "{counted} > {}",
                r.totals.answered()
            );
            // Audits within what the rate allows, over everything so far (a sliding window
            // is a part of it, and the cap grows with it).
            sliding_local += c.bins.iter().map(|b| b.local).sum::<u64>();
            sliding_audited += c.bins.iter().map(|b| b.audited).sum::<u64>();
            assert!(sliding_audited <= max_plausible_audits(sliding_local, c.audit_rate));
        }
        assert_eq!(last_cal_seq, 120);
        assert_eq!(d.policy.threshold, 0.85);
        assert_eq!(d.seq, 120);
    }

    #[test]
    fn a_tuned_threshold_moves_requests_between_tiers() {
        let mut rng = Rng::new(3);
        let low = Policy {
            threshold: 0.0,
            ..Policy::default()
        };
        let w = window(&mut rng, 1000, &low);
        assert_eq!(w.tiers.escalated(), 0);
        let always = Policy {
            threshold: 1.01,
            ..Policy::default()
        };
        let w = window(&mut rng, 1000, &always);
        assert_eq!(w.tiers.edge, 0);
        assert_eq!(w.tiers.audits, 0);
        assert_eq!(w.fallbacks.timeout, w.tiers.edge_fallback);
    }

    #[test]
    fn config_acks_follow_the_agents_rules() {
        let mut d = device();
        let env = |doc: &str| {
            serde_json::json!({"alg":"ed25519","key_id":"0","doc":doc,"sig":"00"})
                .to_string()
                .into_bytes()
        };
        assert_eq!(d.apply_config(b""), None, "a cleared retained message");
        let bare = d
            .apply_config(br#"{"version":1,"device_id":"sim-00001"}"#)
            .expect("ack");
        assert!(!bare.applied && bare.version == 0 && bare.in_force == 0);
        let v3 = env(r#"{"version":3,"device_id":"sim-00001","settings":{"audit_rate":0.05}}"#);
        let ack = d.apply_config(&v3).expect("ack");
        assert!(ack.applied && ack.version == 3 && ack.in_force == 3);
        assert_eq!(d.policy.audit_rate, 0.05);
        assert_eq!(d.apply_config(&v3), None, "the document in force again");
        let old = d
            .apply_config(&env(r#"{"version":2,"device_id":"sim-00001"}"#))
            .expect("ack");
        assert!(
            !old.applied && old.version == 2 && old.in_force == 3,
            "{old:?}"
        );
        let other = d
            .apply_config(&env(r#"{"version":9,"device_id":"sim-00002"}"#))
            .expect("ack");
        assert!(!other.applied && other.in_force == 3);
        let per_model = env(
            r#"{"version":4,"device_id":"sim-00001","settings":{"threshold":0.95,"models":{"digits-edge":{"threshold":0.97}}}}"#,
        );
        assert!(d.apply_config(&per_model).expect("ack").applied);
        assert_eq!(d.policy.threshold, 0.97);
        assert_eq!(d.policy.config_version, 4);
        // Acks travel too.
        let back = decode::<ConfigAck>(&encode(&ack).expect("encode")).expect("decode");
        assert_eq!(back, ack);
    }

    #[test]
    fn a_report_is_about_the_agents_size() {
        let mut d = device();
        let (r, _) = d.next_window(
            &mut Rng::new(9),
            100,
            d.boot_id + 10_000,
            6,
            SpoolCounts::default(),
        );
        let n = encode(&r).expect("encode").len();
        assert!((150..400).contains(&n), "{n} bytes");
    }
}

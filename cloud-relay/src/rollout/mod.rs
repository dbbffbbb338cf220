//! **Where a model rollout is driven.** A new version of an edge model goes to the fleet in
//! waves, is shadow-tested on each device's live traffic, and is promoted or rolled back by the
//! numbers.
//!
//! # The parts
//! - this file: [`Rollouts`], the pure state of every rollout (waves, each device's stage, its
//!   evidence) and what changes it: an operator's start, pause, resume or abort, a device's ack,
//!   a device's shadow report. Each returns the rollout documents to publish; no I/O, no clock
//!   (the caller passes `now`).
//! - [`decide`]: one device's verdict from its paired shadow evidence (exact, at fixed looks).
//! - [`store`]: the rollout's files in the state directory, the persisted state, and the
//!   chunks devices fetch.
//!
//! # One rollout
//! An operator starts a rollout of a candidate (its manifest, the manifest's model-release
//! signature, the ONNX file) for a set of devices, split into **waves**: the canary devices
//! first, then a percentage of the rest, then all that remain. Every device of the current wave
//! gets a retained, signed [`RolloutDocument`] at stage `shadow`: it fetches the file in chunks,
//! verifies it (size, sha256, signature, golden vectors) and shadows. After each of its shadow
//! reports [`decide`] judges it: `promote` (it switches between requests, keeping the old model
//! on disk) or `rollback`. The next wave starts when every device of the wave is promoted.
//!
//! A device that rolls back or fails a check **halts** the rollout: the devices of its wave
//! still shadowing are rolled back, later waves never start; the devices already promoted keep
//! the candidate (each was certified on its own traffic). `abort` rolls every device back,
//! promoted ones included (they switch back to the version they kept). `pause` stops every
//! decision and wave (evidence keeps accumulating); `resume` carries on.
//!
//! Documents carry per-device versions `max(last + 1, now in ms)`, so a device acts on each
//! change once, in order, across relay restarts (the state is persisted, see [`store`]).

pub mod decide;
pub mod serve;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tierd_protocol::rollout::{Labelled, Release, RolloutPhase, ShadowReport};
use tierd_protocol::{RolloutAck, RolloutDocument, RolloutStage};

use crate::tuner::Setup;
pub use decide::{Judgement, Paired, Rules, Verdict};

/// Rollouts kept (finished ones included, for the status) at most.
pub const MAX_ROLLOUTS: usize = 64;
/// Devices in one rollout at most.
pub const MAX_DEVICES: usize = 10_000;

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub id: String,
    pub candidate: Release,
    /// Devices in the rollout, in order.
    pub devices: Vec<String>,
    /// Devices of the first wave (each must be in `devices`).
    pub canary: Vec<String>,
    /// Share of the remaining devices in the second wave, in percent (0: straight to all).
    pub percent: u8,
    pub shadow_rate: f64,
}

/// Why an operator's request was refused.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum RolloutError {
    #[error("rollout id: {0}")]
    Id(String),
    #[error("a rollout named {0:?} exists; pick another id")]
    Exists(String),
    #[error("no rollout named {0:?}")]
    Unknown(String),
    #[error("no devices: name them (or use every device running the model)")]
    NoDevices,
    #[error("device {0:?}: {1}")]
    Device(String, String),
    #[error("canary device {0:?} is not among the rollout's devices")]
    Canary(String),
    #[error("percent = {0} is above 100")]
    Percent(u8),
    #[error("shadow_rate = {0} is outside (0, 1]")]
    ShadowRate(f64),
    #[error("device {device:?} is already in rollout {other:?}, which is not finished")]
    Busy { device: String, other: String },
    #[error("at most {0} rollouts are kept; remove finished ones")]
    Full(usize),
    #[error("rollout {id:?} is {state}: {what} is not possible")]
    State {
        id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("{0}")]
    Document(String),
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    /// A device rolled back or failed: no further waves.
    Halted {
        why: String,
    },
    Aborted,
    /// Every device promoted.
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Halted { .. } => "halted",
            State::Aborted => "aborted",
            State::Done => "done",
        }
    }

    fn finished(&self) -> bool {
        matches!(self, State::Halted { .. } | State::Aborted | State::Done)
    }
}

/// What the relay asked of one device, and what the device said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// In a later wave.
    Waiting,
    Shadow,
    Promote,
    Rollback,
}

/// One device in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRollout {
    pub wave: usize,
    pub stage: Stage,
    /// The version of the last document sent to it (0: none yet), and when it was issued (so a
    /// document sent again is the same bytes).
    pub doc_version: u64,
    #[serde(default)]
    pub doc_issued_ms: u64,
    /// Its last ack: phase, reason, what serves now.
    pub phase: Option<RolloutPhase>,
    pub reason: String,
    pub serving: String,
    pub evidence: Paired,
    pub looks: u32,
    pub judgement: Option<Judgement>,
    /// `(boot_id, seq)` of the last shadow report counted.
    pub last_report: (u64, u64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub spec: Spec,
    pub state: State,
    pub waves: Vec<Vec<String>>,
    /// The wave under way.
    pub wave: usize,
    pub devices: BTreeMap<String, DeviceRollout>,
    pub started_ms: u64,
}

/// Every rollout, the decision rules, and each device's last document version.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rollouts {
    pub rollouts: BTreeMap<String, Rollout>,
    /// The last rollout-document version sent to each device (versions never go back).
    pub versions: BTreeMap<String, u64>,
    #[serde(skip)]
    setup: Setup,
    #[serde(skip)]
    rules: Rules,
}

/// The waves of `spec`: canary, then `percent` of the rest (rounded up), then the remainder;
/// empty waves left out.
pub fn waves(spec: &Spec) -> Vec<Vec<String>> {
    let rest: Vec<String> = spec
        .devices
        .iter()
        .filter(|d| !spec.canary.contains(d))
        .cloned()
        .collect();
    let second = (rest.len() * usize::from(spec.percent)).div_ceil(100);
    let (a, b) = rest.split_at(second.min(rest.len()));
    [spec.canary.clone(), a.to_vec(), b.to_vec()]
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect()
}

impl Rollouts {
    pub fn new(setup: Setup, rules: Rules) -> Self {
        Rollouts {
            setup,
            rules,
            ..Default::default()
        }
    }

    /// The persisted state with the rules in force now.
    pub fn restored(mut self, setup: Setup, rules: Rules) -> Self {
        self.setup = setup;
        self.rules = rules;
        self
    }

    /// Takes `other`'s rollouts (read from the fleet store), keeping the rules in force here.
    pub fn reload(&mut self, other: Rollouts) {
        *self = other.restored(self.setup, self.rules);
    }

    pub fn get(&self, id: &str) -> Option<&Rollout> {
        self.rollouts.get(id)
    }

    /// The rollout device `device` is in, unfinished, if any.
    fn active_for(&self, device: &str) -> Option<&str> {
        self.rollouts
            .iter()
            .find(|(_, r)| !r.state.finished() && r.devices.contains_key(device))
            .map(|(id, _)| id.as_str())
    }

    fn document(
        &mut self,
        id: &str,
        device: &str,
        stage: RolloutStage,
        now_ms: u64,
    ) -> Option<RolloutDocument> {
        let r = self.rollouts.get_mut(id)?;
        let last = self.versions.get(device).copied().unwrap_or(0);
        let version = last.saturating_add(1).max(now_ms);
        self.versions.insert(device.to_string(), version);
        let d = r.devices.get_mut(device)?;
        d.doc_version = version;
        d.doc_issued_ms = now_ms;
        d.stage = match stage {
            RolloutStage::Shadow => Stage::Shadow,
            RolloutStage::Promote => Stage::Promote,
            RolloutStage::Rollback => Stage::Rollback,
        };
        Some(RolloutDocument {
            rollout_id: id.to_string(),
            version,
            device_id: device.to_string(),
            issued_ms: now_ms,
            stage,
            candidate: r.spec.candidate.clone(),
            shadow_rate: r.spec.shadow_rate,
        })
    }

    /// Starts a rollout: the first wave's shadow documents.
    pub fn start(&mut self, spec: Spec, now_ms: u64) -> Result<Vec<RolloutDocument>, RolloutError> {
        tierd_protocol::topic::validate_model_name(&spec.id)
            .map_err(|e| RolloutError::Id(e.to_string()))?;
        if spec.id.starts_with('.') {
            // It names a folder in the state directory: never `.` or `..`.
            return Err(RolloutError::Id(format!(
                "{:?} must not start with '.'",
                spec.id
            )));
        }
        if self.rollouts.contains_key(&spec.id) {
            return Err(RolloutError::Exists(spec.id));
        }
        if self.rollouts.len() >= MAX_ROLLOUTS {
            return Err(RolloutError::Full(MAX_ROLLOUTS));
        }
        if spec.devices.is_empty() {
            return Err(RolloutError::NoDevices);
        }
        if spec.devices.len() > MAX_DEVICES {
            return Err(RolloutError::Device(
                format!("{} devices", spec.devices.len()),
                format!("at most {MAX_DEVICES} in one rollout"),
            ));
        }
        for d in &spec.devices {
            tierd_protocol::topic::validate_device_id(d)
                .map_err(|e| RolloutError::Device(d.clone(), e.to_string()))?;
            if let Some(other) = self.active_for(d) {
                return Err(RolloutError::Busy {
                    device: d.clone(),
                    other: other.to_string(),
                });
            }
        }
        if let Some(c) = spec.canary.iter().find(|c| !spec.devices.contains(c)) {
            return Err(RolloutError::Canary(c.clone()));
        }
        if spec.percent > 100 {
            return Err(RolloutError::Percent(spec.percent));
        }
        if !(spec.shadow_rate.is_finite() && spec.shadow_rate > 0.0 && spec.shadow_rate <= 1.0) {
            return Err(RolloutError::ShadowRate(spec.shadow_rate));
        }
        let waves = waves(&spec);
        let mut devices = BTreeMap::new();
        for (i, w) in waves.iter().enumerate() {
            for d in w {
                devices.insert(
                    d.clone(),
                    DeviceRollout {
                        wave: i,
                        stage: Stage::Waiting,
                        doc_version: 0,
                        doc_issued_ms: 0,
                        phase: None,
                        reason: String::new(),
                        serving: String::new(),
                        evidence: Paired::default(),
                        looks: 0,
                        judgement: None,
                        last_report: (0, 0),
                    },
                );
            }
        }
        let id = spec.id.clone();
        // Check the document a device will get before anything is kept.
        let probe = RolloutDocument {
            rollout_id: id.clone(),
            version: 1,
            device_id: spec.devices[0].clone(),
            issued_ms: now_ms,
            stage: RolloutStage::Shadow,
            candidate: spec.candidate.clone(),
            shadow_rate: spec.shadow_rate,
        };
        probe
            .validate()
            .map_err(|e| RolloutError::Document(e.to_string()))?;
        self.rollouts.insert(
            id.clone(),
            Rollout {
                spec,
                state: State::Running,
                waves,
                wave: 0,
                devices,
                started_ms: now_ms,
            },
        );
        Ok(self.start_wave(&id, 0, now_ms))
    }

    fn start_wave(&mut self, id: &str, wave: usize, now_ms: u64) -> Vec<RolloutDocument> {
        let Some(r) = self.rollouts.get_mut(id) else {
            return Vec::new();
        };
        r.wave = wave;
        let Some(members) = r.waves.get(wave).cloned() else {
            r.state = State::Done;
            return Vec::new();
        };
        members
            .iter()
            .filter_map(|d| self.document(id, d, RolloutStage::Shadow, now_ms))
            .collect()
    }

    /// Stops the rollout from going further: the devices still shadowing roll back.
    fn halt(&mut self, id: &str, why: String, now_ms: u64) -> Vec<RolloutDocument> {
        let Some(r) = self.rollouts.get_mut(id) else {
            return Vec::new();
        };
        tracing::warn!(rollout = %id, %why, "rollout halted");
        r.state = State::Halted { why };
        let shadowing: Vec<String> = r
            .devices
            .iter()
            .filter(|(_, d)| d.stage == Stage::Shadow)
            .map(|(k, _)| k.clone())
            .collect();
        shadowing
            .iter()
            .filter_map(|d| self.document(id, d, RolloutStage::Rollback, now_ms))
            .collect()
    }

    /// The next wave, if every device of this one is promoted.
    fn advance(&mut self, id: &str, now_ms: u64) -> Vec<RolloutDocument> {
        let Some(r) = self.rollouts.get(id) else {
            return Vec::new();
        };
        if r.state != State::Running {
            return Vec::new();
        }
        let wave_done = r.waves.get(r.wave).is_some_and(|w| {
            w.iter().all(|d| {
                r.devices.get(d).is_some_and(|x| {
                    x.stage == Stage::Promote && x.phase == Some(RolloutPhase::Promoted)
                })
            })
        });
        if !wave_done {
            return Vec::new();
        }
        let next = r.wave + 1;
        self.start_wave(id, next, now_ms)
    }

    /// A device's ack: records it; a failure halts the rollout; a promotion may start the
    /// next wave.
    pub fn on_ack(&mut self, device: &str, ack: &RolloutAck, now_ms: u64) -> Vec<RolloutDocument> {
        let id = ack.rollout_id.clone();
        let Some(r) = self.rollouts.get_mut(&id) else {
            return Vec::new();
        };
        let Some(d) = r.devices.get_mut(device) else {
            return Vec::new();
        };
        // An ack of an older document says nothing about the current stage.
        if ack.version != d.doc_version {
            return Vec::new();
        }
        d.phase = Some(ack.phase);
        d.reason = ack.reason.clone();
        d.serving = ack.serving.clone();
        let running = matches!(r.state, State::Running | State::Paused);
        match ack.phase {
            RolloutPhase::Failed if running && d.stage != Stage::Rollback => {
                let why = format!("device {device}: {}", ack.reason);
                d.stage = Stage::Rollback;
                self.halt(&id, why, now_ms)
            }
            RolloutPhase::Promoted => {
                // Also a device that already served the candidate ("already serving").
                d.stage = Stage::Promote;
                self.advance(&id, now_ms)
            }
            _ => Vec::new(),
        }
    }

    /// A device's shadow report: adds it to the device's evidence and, while the rollout runs,
    /// judges it.
    pub fn on_shadow(
        &mut self,
        device: &str,
        report: &ShadowReport,
        now_ms: u64,
    ) -> Result<Vec<RolloutDocument>, String> {
        let id = report.rollout_id.clone();
        let setup = self.setup;
        let rules = self.rules;
        let r = self
            .rollouts
            .get_mut(&id)
            .ok_or_else(|| format!("no rollout {:?}", id.chars().take(80).collect::<String>()))?;
        if report.candidate != r.spec.candidate.model {
            return Err(format!(
                "shadow report of candidate {:?}, but rollout {id} ships {}",
                report.candidate.chars().take(80).collect::<String>(),
                r.spec.candidate.model
            ));
        }
        let d = r
            .devices
            .get_mut(device)
            .ok_or_else(|| format!("device {device} is not in rollout {id}"))?;
        if d.stage != Stage::Shadow {
            return Ok(Vec::new());
        }
        plausible(report, d)?;
        d.last_report = (report.boot_id, report.seq);
        let e = &mut d.evidence;
        if e.edges != report.edges {
            // New bins: start over (never mix incomparable counts).
            *e = Paired {
                edges: report.edges.clone(),
                current: vec![Labelled::default(); report.edges.len()],
                candidate: vec![Labelled::default(); report.edges.len()],
                ..Default::default()
            };
        }
        for (o, b) in e.current.iter_mut().zip(&report.current_bins) {
            o.requests = o.requests.saturating_add(b.requests);
            o.agree = o.agree.saturating_add(b.agree);
        }
        for (o, b) in e.candidate.iter_mut().zip(&report.candidate_bins) {
            o.requests = o.requests.saturating_add(b.requests);
            o.agree = o.agree.saturating_add(b.agree);
        }
        e.current_only = e.current_only.saturating_add(report.current_only);
        e.candidate_only = e.candidate_only.saturating_add(report.candidate_only);
        if r.state != State::Running {
            return Ok(Vec::new());
        }
        let (judgement, looks) = decide::decide(e, d.looks, &setup, &rules);
        d.looks = looks;
        let verdict = judgement.verdict.clone();
        d.judgement = Some(judgement);
        Ok(match verdict {
            Verdict::Wait { .. } => Vec::new(),
            Verdict::Promote { why } => {
                tracing::info!(rollout = %id, %device, %why, "promoting");
                self.document(&id, device, RolloutStage::Promote, now_ms)
                    .into_iter()
                    .collect()
            }
            Verdict::RollBack { why } => {
                tracing::warn!(rollout = %id, %device, %why, "rolling back");
                let mut docs: Vec<_> = self
                    .document(&id, device, RolloutStage::Rollback, now_ms)
                    .into_iter()
                    .collect();
                docs.extend(self.halt(&id, format!("device {device}: {why}"), now_ms));
                docs
            }
        })
    }

    pub fn pause(&mut self, id: &str) -> Result<(), RolloutError> {
        let r = self.rollout_mut(id)?;
        match r.state {
            State::Running => {
                r.state = State::Paused;
                Ok(())
            }
            ref s => Err(RolloutError::State {
                id: id.to_string(),
                state: s.name(),
                what: "pause",
            }),
        }
    }

    /// Resumes a paused rollout; the wave may be complete already.
    pub fn resume(&mut self, id: &str, now_ms: u64) -> Result<Vec<RolloutDocument>, RolloutError> {
        let r = self.rollout_mut(id)?;
        match r.state {
            State::Paused => {
                r.state = State::Running;
                Ok(self.advance(id, now_ms))
            }
            ref s => Err(RolloutError::State {
                id: id.to_string(),
                state: s.name(),
                what: "resume",
            }),
        }
    }

    /// Rolls every device back, promoted ones included.
    pub fn abort(&mut self, id: &str, now_ms: u64) -> Result<Vec<RolloutDocument>, RolloutError> {
        let r = self
            .rollouts
            .get_mut(id)
            .ok_or_else(|| RolloutError::Unknown(id.chars().take(80).collect()))?;
        if matches!(r.state, State::Aborted) {
            return Err(RolloutError::State {
                id: id.to_string(),
                state: "aborted",
                what: "abort",
            });
        }
        r.state = State::Aborted;
        // Not a device a later rollout has sent a document since: that one is in charge of it.
        let versions = &self.versions;
        let touched: Vec<String> = r
            .devices
            .iter()
            .filter(|(k, d)| d.stage != Stage::Waiting && versions.get(*k) == Some(&d.doc_version))
            .map(|(k, _)| k.clone())
            .collect();
        Ok(touched
            .iter()
            .filter_map(|d| self.document(id, d, RolloutStage::Rollback, now_ms))
            .collect())
    }

    fn rollout_mut(&mut self, id: &str) -> Result<&mut Rollout, RolloutError> {
        self.rollouts
            .get_mut(id)
            .ok_or_else(|| RolloutError::Unknown(id.chars().take(80).collect()))
    }

    /// The last document sent to `device`, to send again when it comes online: a broker need
    /// not hand a retained message to a session it kept, and an agent killed before it took
    /// one would otherwise never see it.
    pub fn document_for(&self, device: &str) -> Option<RolloutDocument> {
        let last = *self.versions.get(device)?;
        self.current_documents()
            .into_iter()
            .find(|d| d.device_id == device && d.version == last)
    }

    /// Each device's newest document (retained on the broker), for a relay that restarted on an
    /// embedded broker that forgot them; older rollouts' documents are not sent again.
    pub fn newest_documents(&self) -> Vec<RolloutDocument> {
        self.current_documents()
            .into_iter()
            .filter(|d| self.versions.get(&d.device_id) == Some(&d.version))
            .collect()
    }

    /// The document each device of every rollout was last sent.
    pub fn current_documents(&self) -> Vec<RolloutDocument> {
        let mut out = Vec::new();
        for (id, r) in &self.rollouts {
            for (device, d) in &r.devices {
                let stage = match d.stage {
                    Stage::Waiting => continue,
                    Stage::Shadow => RolloutStage::Shadow,
                    Stage::Promote => RolloutStage::Promote,
                    Stage::Rollback => RolloutStage::Rollback,
                };
                out.push(RolloutDocument {
                    rollout_id: id.clone(),
                    version: d.doc_version,
                    device_id: device.clone(),
                    issued_ms: d.doc_issued_ms,
                    stage,
                    candidate: r.spec.candidate.clone(),
                    shadow_rate: r.spec.shadow_rate,
                });
            }
        }
        out
    }
}

/// Whether a shadow report can be true: counted once and in order, one bin per edge for both
/// models, the same requests for both, agreements and discordant pairs within them.
fn plausible(r: &ShadowReport, d: &DeviceRollout) -> Result<(), String> {
    if (r.boot_id, r.seq) <= d.last_report {
        return Err(format!(
            "shadow report (boot {}, seq {}) was already counted",
            r.boot_id, r.seq
        ));
    }
    let n = r.edges.len();
    if n == 0 || r.current_bins.len() != n || r.candidate_bins.len() != n || n > 256 {
        return Err("shadow report bins do not match its edges".into());
    }
    let pairs = r.pairs();
    let cand = r
        .candidate_bins
        .iter()
        .fold(0u64, |a, b| a.saturating_add(b.requests));
    if pairs != cand {
        return Err(format!(
            "shadow report counts {pairs} requests for the current model but {cand} for the \
             candidate; they are the same requests"
        ));
    }
    if r.current_bins
        .iter()
        .chain(&r.candidate_bins)
        .any(|b| b.agree > b.requests)
    {
        return Err("shadow report counts more agreements than requests".into());
    }
    let agree = |bins: &[Labelled]| bins.iter().fold(0u64, |a, b| a.saturating_add(b.agree));
    let (a, c) = (agree(&r.current_bins), agree(&r.candidate_bins));
    // Only-current pairs are current-agree minus both-agree, so at most `a` and at most
    // `pairs - c`; the same the other way.
    if r.current_only > a.min(pairs.saturating_sub(c))
        || r.candidate_only > c.min(pairs.saturating_sub(a))
    {
        return Err("shadow report's discordant pairs do not fit its agreements".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tierd_protocol::rollout::Labelled;

    fn release() -> Release {
        Release {
            model: "m@2".into(),
            manifest: "x".into(),
            signature: "{}".into(),
            onnx_bytes: 10,
            onnx_sha256: "ab".repeat(32),
        }
    }

    fn spec(devices: &[&str], canary: &[&str], percent: u8) -> Spec {
        Spec {
            id: "r1".into(),
            candidate: release(),
            devices: devices.iter().map(|s| s.to_string()).collect(),
            canary: canary.iter().map(|s| s.to_string()).collect(),
            percent,
            shadow_rate: 0.5,
        }
    }

    fn rules() -> Rules {
        Rules {
            min_pairs: 1000,
            max_pairs: 1000,
        }
    }

    fn ack(doc: &RolloutDocument, phase: RolloutPhase) -> RolloutAck {
        RolloutAck {
            rollout_id: doc.rollout_id.clone(),
            version: doc.version,
            phase,
            reason: String::new(),
            serving: String::new(),
        }
    }

    /// A shadow report of 1,000 pairs: the candidate wrong on `cand_wrong` of them, the
    /// current model on 300 (errors disjoint).
    fn report(seq: u64, cand_wrong: u64) -> ShadowReport {
        ShadowReport {
            device_id: "x".into(),
            boot_id: 1,
            seq,
            rollout_id: "r1".into(),
            current: "m@1".into(),
            candidate: "m@2".into(),
            edges: vec![0.0, 0.5],
            current_bins: vec![
                Labelled {
                    requests: 400,
                    agree: 100,
                },
                Labelled {
                    requests: 600,
                    agree: 600,
                },
            ],
            candidate_bins: vec![
                Labelled {
                    requests: 100,
                    agree: 100 - cand_wrong.min(100),
                },
                Labelled {
                    requests: 900,
                    agree: 900 - cand_wrong.saturating_sub(100),
                },
            ],
            current_only: cand_wrong,
            candidate_only: 300,
        }
    }

    #[test]
    fn waves_are_canary_then_percent_then_the_rest() {
        let w = waves(&spec(&["a", "b", "c", "d", "e"], &["c"], 50));
        assert_eq!(w, [vec!["c"], vec!["a", "b"], vec!["d", "e"]]);
        let w = waves(&spec(&["a", "b"], &[], 0));
        assert_eq!(w, [vec!["a", "b"]]);
        let w = waves(&spec(&["a", "b", "c"], &[], 100));
        assert_eq!(w, [vec!["a", "b", "c"]]);
    }

    #[test]
    fn refuses_bad_starts_with_the_reason() {
        let mut r = Rollouts::new(Setup::default(), rules());
        assert_eq!(r.start(spec(&[], &[], 0), 1), Err(RolloutError::NoDevices));
        assert!(matches!(
            r.start(spec(&["a"], &["z"], 0), 1),
            Err(RolloutError::Canary(_))
        ));
        assert!(matches!(
            r.start(spec(&["a/b"], &[], 0), 1),
            Err(RolloutError::Device(..))
        ));
        for id in ["..", ".", ".x"] {
            let mut s = spec(&["a"], &[], 0);
            s.id = id.into();
            assert!(matches!(r.start(s, 1), Err(RolloutError::Id(_))), "{id}");
        }
        let mut s = spec(&["a"], &[], 0);
        s.shadow_rate = 0.0;
        assert!(matches!(r.start(s, 1), Err(RolloutError::ShadowRate(_))));
        let mut s = spec(&["a"], &[], 0);
        s.candidate.onnx_sha256 = "no".into();
        assert!(matches!(r.start(s, 1), Err(RolloutError::Document(_))));
        r.start(spec(&["a"], &[], 0), 1).expect("start");
        assert!(matches!(
            r.start(spec(&["a"], &[], 0), 1),
            Err(RolloutError::Exists(_))
        ));
        let mut other = spec(&["a"], &[], 0);
        other.id = "r2".into();
        assert!(matches!(r.start(other, 1), Err(RolloutError::Busy { .. })));
    }

    #[test]
    fn canary_promoted_then_the_next_wave_then_done() {
        let mut r = Rollouts::new(Setup::default(), rules());
        let docs = r.start(spec(&["a", "b"], &["a"], 0), 1_000).expect("start");
        assert_eq!(docs.len(), 1);
        assert_eq!(
            (docs[0].device_id.as_str(), docs[0].stage),
            ("a", RolloutStage::Shadow)
        );
        assert!(r
            .on_ack("a", &ack(&docs[0], RolloutPhase::Shadowing), 1_001)
            .is_empty());
        let docs = r.on_shadow("a", &report(1, 0), 1_002).expect("plausible");
        assert_eq!(docs.len(), 1, "{:?}", r.get("r1"));
        assert_eq!(docs[0].stage, RolloutStage::Promote);
        assert!(docs[0].version > 1_000);
        // The same report again is not counted twice.
        assert!(r.on_shadow("a", &report(1, 0), 1_003).is_ok());
        let next = r.on_ack("a", &ack(&docs[0], RolloutPhase::Promoted), 1_004);
        assert_eq!(next.len(), 1);
        assert_eq!(
            (next[0].device_id.as_str(), next[0].stage),
            ("b", RolloutStage::Shadow)
        );
        let p = r.on_shadow("b", &report(1, 0), 1_005).expect("ok");
        r.on_ack("b", &ack(&p[0], RolloutPhase::Promoted), 1_006);
        assert_eq!(r.get("r1").map(|x| &x.state), Some(&State::Done));
    }

    #[test]
    fn a_worse_candidate_rolls_back_and_halts_the_rollout() {
        let mut r = Rollouts::new(Setup::default(), rules());
        let docs = r
            .start(spec(&["a", "b", "c"], &[], 100), 1_000)
            .expect("start");
        assert_eq!(docs.len(), 3, "one wave of three");
        // The candidate is wrong on 600 pairs where the current model is right.
        let mut bad = report(1, 600);
        bad.candidate_only = 0;
        bad.current_bins[0].agree = 400;
        let out = r.on_shadow("a", &bad, 1_001).expect("plausible");
        // a rolls back; b and c, still shadowing, too; the rollout is halted.
        let mut stages: Vec<_> = out
            .iter()
            .map(|d| (d.device_id.as_str(), d.stage))
            .collect();
        stages.sort();
        assert_eq!(
            stages,
            [
                ("a", RolloutStage::Rollback),
                ("b", RolloutStage::Rollback),
                ("c", RolloutStage::Rollback)
            ]
        );
        let state = &r.get("r1").expect("rollout").state;
        assert!(
            matches!(state, State::Halted { why } if why.contains("certified worse")),
            "{state:?}"
        );
        // A finished rollout frees its devices.
        let mut again = spec(&["a"], &[], 0);
        again.id = "r2".into();
        assert!(r.start(again, 2_000).is_ok());
    }

    #[test]
    fn a_failed_check_halts_pause_holds_decisions_and_abort_rolls_everyone_back() {
        let mut r = Rollouts::new(Setup::default(), rules());
        let docs = r.start(spec(&["a", "b"], &[], 100), 1_000).expect("start");
        r.pause("r1").expect("pause");
        // Paused: evidence counts, nothing is decided.
        assert!(r
            .on_shadow("a", &report(1, 0), 1_001)
            .expect("ok")
            .is_empty());
        let p = r.resume("r1", 1_002).expect("resume");
        assert!(p.is_empty());
        let p = r.on_shadow("a", &report(2, 0), 1_003).expect("ok");
        assert_eq!(p[0].stage, RolloutStage::Promote);
        r.on_ack("a", &ack(&p[0], RolloutPhase::Promoted), 1_004);
        // b fails verification: halted, and the promoted a keeps the candidate...
        let b = docs.iter().find(|d| d.device_id == "b").expect("b");
        let mut failed = ack(b, RolloutPhase::Failed);
        failed.reason = "sha256 mismatch".into();
        let out = r.on_ack("b", &failed, 1_005);
        assert!(out.is_empty(), "b was the only one shadowing: {out:?}");
        assert!(
            matches!(&r.get("r1").expect("r").state, State::Halted { why } if why.contains("sha256"))
        );
        // ...until an abort rolls it back too.
        let out = r.abort("r1", 1_006).expect("abort");
        let mut devices: Vec<_> = out.iter().map(|d| d.device_id.as_str()).collect();
        devices.sort();
        assert_eq!(devices, ["a", "b"]);
        assert!(out.iter().all(|d| d.stage == RolloutStage::Rollback));
        assert!(r.pause("r1").is_err());
    }

    #[test]
    fn aborting_an_old_rollout_leaves_devices_a_newer_one_took_over() {
        let mut r = Rollouts::new(Setup::default(), rules());
        let d = r.start(spec(&["a"], &[], 0), 1_000).expect("start");
        let p = r.on_shadow("a", &report(1, 0), 1_001).expect("ok");
        r.on_ack("a", &ack(&p[0], RolloutPhase::Promoted), 1_002);
        assert_eq!(r.get("r1").map(|x| &x.state), Some(&State::Done));
        let mut next = spec(&["a"], &[], 0);
        next.id = "r2".into();
        r.start(next, 1_003).expect("r2");
        assert!(r.abort("r1", 1_004).expect("abort").is_empty(), "{d:?}");
        assert_eq!(r.document_for("a").map(|x| x.rollout_id), Some("r2".into()));
    }

    #[test]
    fn the_last_document_is_there_to_send_again() {
        let mut r = Rollouts::new(Setup::default(), rules());
        assert_eq!(r.document_for("a"), None);
        let docs = r.start(spec(&["a", "b"], &["a"], 0), 1_000).expect("start");
        assert_eq!(
            r.document_for("a").map(|d| (d.version, d.stage)),
            Some((docs[0].version, RolloutStage::Shadow))
        );
        assert_eq!(r.document_for("b"), None, "b waits");
        let p = r.on_shadow("a", &report(1, 0), 1_001).expect("ok");
        assert_eq!(r.document_for("a"), Some(p[0].clone()), "the same document");
        assert_eq!(
            r.document_for("a").map(|d| d.stage),
            Some(RolloutStage::Promote)
        );
    }

    #[test]
    fn implausible_shadow_reports_are_refused_with_the_reason() {
        let mut r = Rollouts::new(Setup::default(), rules());
        r.start(spec(&["a"], &[], 0), 1_000).expect("start");
        let mut lying = report(1, 0);
        lying.candidate_bins[1].requests = 5000;
        assert!(r
            .on_shadow("a", &lying, 1)
            .unwrap_err()
            .contains("same requests"));
        let mut lying = report(1, 0);
        lying.current_bins[0].agree = 401;
        assert!(r
            .on_shadow("a", &lying, 1)
            .unwrap_err()
            .contains("agreements"));
        let mut lying = report(1, 0);
        lying.candidate_only = 999;
        assert!(r
            .on_shadow("a", &lying, 1)
            .unwrap_err()
            .contains("discordant"));
        let mut other = report(1, 0);
        other.candidate = "m@9".into();
        assert!(r
            .on_shadow("a", &other, 1)
            .unwrap_err()
            .contains("ships m@2"));
        assert!(r
            .on_shadow("zz", &report(1, 0), 1)
            .unwrap_err()
            .contains("not in rollout"));
        // Nothing was counted.
        assert_eq!(r.get("r1").expect("r").devices["a"].evidence.pairs(), 0);
    }
}

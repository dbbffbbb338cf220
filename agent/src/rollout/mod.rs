//! **Where a new model version is taken on.** The relay's signed rollout documents, retained on
//! `tierd/v1/{device}/rollout`, ask for one of three steps; each is acknowledged through the
//! spool (`RolloutAck`):
//!
//! - `shadow`: fetch the candidate's file in chunks ([`fetch`], resumable), verify it (size and
//!   sha256, the manifest's model-release signature by a key in `[model] trusted_keys`, tract
//!   loads it, its golden vectors pass) and store it beside the serving model ([`store`]); then
//!   run it in [`shadow`] on a sample of live requests, never delaying them. Its paired
//!   evidence goes to the relay with each telemetry window (`ShadowReport`).
//! - `promote`: switch to the candidate between requests (requests in flight finish on the old
//!   model), recording it in `active.json` first so a restart comes back on it, and announce it
//!   in the status. The old model stays on disk.
//! - `rollback`: stop the shadow; if the candidate serves, switch back to the model it replaced.
//!
//! A document is taken only if a trusted relay key (`[remote_config] trusted_keys`) signed it,
//! it names this device, its version is above the last one handled, and its candidate is a
//! version of the primary model (`[model]`; its name is the OIP route and the escalation topic).
//! Rollouts need signed models: with no model-release key pinned every rollout is refused.
//! Any check that fails is acknowledged as `Failed` with the reason, and the serving model is
//! untouched. The last document taken is kept in the state directory, so a step cut short by a
//! restart is taken up again at start, and a shadow resumes.

pub mod fetch;
pub mod shadow;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::Publish;
use tierd_protocol::rollout::MAX_SIGNED_ROLLOUT_BYTES;
use tierd_protocol::{
    signed, PublicKey, RecordKind, RolloutAck, RolloutDocument, RolloutPhase, RolloutStage,
    ServedModel, ShadowReport,
};
use tierd_runtime::Model;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cascade::Serving;
use crate::evidence::EDGES;
use crate::forward::SpoolSink;
use crate::link::{model_calibration, Announcer};
use crate::telemetry::ReportSink;
use shadow::Shadow;
use store::{Active, Handled};

/// What the rollout task needs.
pub struct Rollouts {
    pub state_dir: PathBuf,
    pub device_id: String,
    /// Relay keys that sign rollout documents (the config keys).
    pub relay_keys: Vec<PublicKey>,
    /// Model-release keys candidates must be signed by.
    pub model_keys: Vec<PublicKey>,
    /// The manifest `agent.toml` names (what a rollback of a first rollout goes back to).
    pub configured_manifest: PathBuf,
    pub serving: Arc<Serving<Model>>,
    pub sink: SpoolSink,
    pub fetcher: fetch::Fetcher,
    pub announcer: Announcer,
    /// The further models the status also announces.
    pub further: Vec<ServedModel>,
    /// Cloud calls per second the shadow may add at most.
    pub max_shadow_per_second: u32,
}

/// The model to serve at start: the one `active.json` names if it still verifies, else the
/// one `agent.toml` names (`configured`, already verified). Returns it and why, if the file's
/// was refused.
pub fn starting_model(
    state_dir: &std::path::Path,
    configured: Model,
    model_keys: &[PublicKey],
) -> (Model, Option<String>) {
    let name = configured.manifest().name.clone();
    match store::load_active(state_dir) {
        Ok(None) => (configured, None),
        Ok(Some(a)) => match Model::load_trusted(&a.manifest, model_keys) {
            Ok(m) if m.manifest().name == name => {
                info!(model = %m.id(), manifest = %a.manifest.display(), "serving the model a rollout promoted");
                (m, None)
            }
            Ok(m) => (
                configured,
                Some(format!(
                    "{} names {}, not a version of {name}",
                    a.manifest.display(),
                    m.id(),
                )),
            ),
            Err(e) => (
                configured,
                Some(format!("the promoted model is refused: {e}")),
            ),
        },
        Err(e) => (configured, Some(e)),
    }
}

impl Rollouts {
    fn ack(&self, doc: &RolloutDocument, phase: RolloutPhase, reason: String) {
        let ack = RolloutAck {
            rollout_id: doc.rollout_id.clone(),
            version: doc.version,
            phase,
            reason,
            serving: self.serving.model().id(),
        };
        match tierd_protocol::encode(&ack) {
            Ok(bytes) => {
                if let Err(e) = self.sink.send(RecordKind::RolloutAck, bytes) {
                    warn!(error = %e, "rollout ack not spooled");
                }
            }
            Err(e) => warn!(error = %e, "rollout ack cannot be encoded"),
        }
    }

    fn fail(&self, doc: &RolloutDocument, why: String) {
        warn!(rollout = %doc.rollout_id, version = doc.version, reason = %why, "rollout step refused; the serving model is unchanged");
        self.ack(doc, RolloutPhase::Failed, why);
    }

    fn announce(&self) {
        let m = self.serving.model();
        self.announcer
            .announce(model_calibration(m.manifest()), self.further.clone());
    }

    /// Checks a payload: signed by a trusted relay key, a valid document for this device.
    fn verify(&self, payload: &[u8]) -> Result<RolloutDocument, String> {
        if payload.len() > MAX_SIGNED_ROLLOUT_BYTES {
            return Err(format!(
                "signed rollout document of {} bytes exceeds {MAX_SIGNED_ROLLOUT_BYTES}",
                payload.len()
            ));
        }
        let text = signed::verify_envelope(payload, &self.relay_keys).map_err(|e| e.to_string())?;
        let doc = RolloutDocument::from_json(text.as_bytes()).map_err(|e| e.to_string())?;
        if doc.device_id != self.device_id {
            return Err(format!(
                "the document is for device {:?}, this is {:?}",
                doc.device_id, self.device_id
            ));
        }
        Ok(doc)
    }

    /// Fetches and verifies the candidate; the verified model.
    async fn obtain(&mut self, doc: &RolloutDocument) -> Result<Model, String> {
        let primary = self.serving.model().manifest().name.clone();
        if doc.candidate_name() != primary {
            return Err(format!(
                "candidate {} is not a version of the primary model {primary}",
                doc.candidate.model
            ));
        }
        if self.model_keys.is_empty() {
            return Err(
                "no model-release keys pinned ([model] trusted_keys): rollouts bring only \
                 signed models"
                    .into(),
            );
        }
        let c = &doc.candidate;
        let paths = store::prepare(&self.state_dir, c)?;
        let have = store::have(&paths, c.onnx_bytes);
        if have < c.onnx_bytes {
            info!(rollout = %doc.rollout_id, model = %c.model, have, total = c.onnx_bytes, "fetching the candidate");
            self.ack(
                doc,
                RolloutPhase::Downloading {
                    have,
                    total: c.onnx_bytes,
                },
                String::new(),
            );
            let total = c.onnx_bytes;
            let (id, sha) = (doc.rollout_id.clone(), c.onnx_sha256.clone());
            self.fetcher
                .fetch(&id, &sha, total, &paths, |h| {
                    info!(have = h, total, "candidate download")
                })
                .await?;
        }
        store::finish(&paths, c.onnx_bytes, &c.onnx_sha256)?;
        let model =
            Model::load_trusted(&paths.manifest, &self.model_keys).map_err(|e| e.to_string())?;
        info!(model = %model.id(), "candidate verified (size, sha256, signature, golden vectors)");
        Ok(model)
    }

    async fn shadow(&mut self, doc: &RolloutDocument) -> Result<(), String> {
        if self.serving.model().id() == doc.candidate.model {
            self.ack(doc, RolloutPhase::Promoted, "already serving".into());
            return Ok(());
        }
        let model = self.obtain(doc).await?;
        self.serving.set_shadow(Some(Arc::new(Shadow::new(
            &doc.rollout_id,
            &doc.candidate.model,
            model,
            doc.shadow_rate,
            self.max_shadow_per_second,
        ))));
        info!(rollout = %doc.rollout_id, model = %doc.candidate.model, rate = doc.shadow_rate, "shadowing");
        self.ack(doc, RolloutPhase::Shadowing, String::new());
        Ok(())
    }

    async fn promote(&mut self, doc: &RolloutDocument) -> Result<(), String> {
        let current = self.serving.model();
        if current.id() != doc.candidate.model {
            let model = self.obtain(doc).await?;
            let paths = store::prepare(&self.state_dir, &doc.candidate)?;
            let previous = match store::load_active(&self.state_dir)? {
                Some(a) => a.manifest,
                None => self.configured_manifest.clone(),
            };
            // Recorded before the switch: a restart from here on serves the candidate.
            store::save_active(
                &self.state_dir,
                &Active {
                    manifest: paths.manifest.clone(),
                    previous,
                    rollout_id: doc.rollout_id.clone(),
                },
            )?;
            self.serving.switch(model);
            info!(rollout = %doc.rollout_id, from = %current.id(), to = %doc.candidate.model, "promoted: serving the candidate");
            self.announce();
        }
        self.serving.set_shadow(None);
        self.ack(doc, RolloutPhase::Promoted, String::new());
        Ok(())
    }

    async fn rollback(&mut self, doc: &RolloutDocument) -> Result<(), String> {
        // Only this rollout's shadow (a newer rollout's stays).
        if self
            .serving
            .shadow()
            .is_some_and(|s| s.rollout_id == doc.rollout_id)
        {
            self.serving.set_shadow(None);
        }
        let current = self.serving.model();
        if current.id() == doc.candidate.model {
            let active = store::load_active(&self.state_dir)?;
            let previous = active
                .map(|a| a.previous)
                .unwrap_or_else(|| self.configured_manifest.clone());
            let model = Model::load_trusted(&previous, &self.model_keys)
                .map_err(|e| format!("the previous model is refused: {e}"))?;
            if previous == self.configured_manifest {
                store::clear_active(&self.state_dir)?;
            } else {
                store::save_active(
                    &self.state_dir,
                    &Active {
                        manifest: previous.clone(),
                        previous: self.configured_manifest.clone(),
                        rollout_id: doc.rollout_id.clone(),
                    },
                )?;
            }
            self.serving.switch(model);
            info!(rollout = %doc.rollout_id, from = %current.id(), to = %self.serving.model().id(), "rolled back: serving the previous model");
            self.announce();
        } else {
            info!(rollout = %doc.rollout_id, model = %doc.candidate.model, "rolled back: the candidate is dropped");
        }
        self.ack(doc, RolloutPhase::RolledBack, String::new());
        Ok(())
    }

    async fn handle(&mut self, payload: &[u8]) {
        let doc = match self.verify(payload) {
            Ok(d) => d,
            Err(why) => {
                warn!(reason = %why, "rollout document refused");
                return;
            }
        };
        let handled = store::load_handled(&self.state_dir);
        let same = handled.rollout_id == doc.rollout_id && handled.version == doc.version;
        if doc.version < handled.version || (same && handled.done && !self.resumes(&doc)) {
            return;
        }
        if let Err(e) = store::save_document(&self.state_dir, payload) {
            warn!(error = %e, "cannot keep the rollout document for a restart");
        }
        let mut record = Handled {
            rollout_id: doc.rollout_id.clone(),
            version: doc.version,
            stage: doc.stage.as_str().to_string(),
            done: false,
        };
        if let Err(e) = store::save_handled(&self.state_dir, &record) {
            warn!(error = %e, "cannot record the rollout step");
        }
        let result = match doc.stage {
            RolloutStage::Shadow => self.shadow(&doc).await,
            RolloutStage::Promote => self.promote(&doc).await,
            RolloutStage::Rollback => self.rollback(&doc).await,
        };
        if let Err(why) = result {
            self.serving.set_shadow(None);
            self.fail(&doc, why);
        }
        record.done = true;
        if let Err(e) = store::save_handled(&self.state_dir, &record) {
            warn!(error = %e, "cannot record the rollout step");
        }
    }

    /// A shadow handled before this agent started is taken again: the shadow lives in memory.
    fn resumes(&self, doc: &RolloutDocument) -> bool {
        doc.stage == RolloutStage::Shadow && self.serving.shadow().is_none()
    }
}

/// The shadow's window as a report, if anything was shadowed in it.
pub fn shadow_report(serving: &Serving<Model>, header: (&str, u64, u64)) -> Option<ShadowReport> {
    let s = serving.shadow()?;
    let w = s.take_window();
    if w.pairs() == 0 {
        return None;
    }
    let (device_id, boot_id, seq) = header;
    Some(ShadowReport {
        device_id: device_id.to_string(),
        boot_id,
        seq,
        rollout_id: s.rollout_id.clone(),
        current: serving.model().id(),
        candidate: s.candidate_id.clone(),
        edges: EDGES.to_vec(),
        current_bins: w.current.to_vec(),
        candidate_bins: w.candidate.to_vec(),
        current_only: w.current_only,
        candidate_only: w.candidate_only,
    })
}

/// Handles the documents the link delivers until it closes or `shutdown` resolves. A new
/// document preempts a download in progress (what was fetched stays on disk).
pub async fn run(
    mut r: Rollouts,
    mut documents: mpsc::Receiver<Publish>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // The document of the last step, again: one cut short by a restart is taken up, a shadow
    // (which lives in memory) resumes.
    let mut pending: Option<Vec<u8>> = store::load_document(&r.state_dir);
    loop {
        let payload = match pending.take() {
            Some(p) => p,
            None => tokio::select! {
                p = documents.recv() => match p { Some(p) => p.payload.to_vec(), None => return },
                _ = &mut shutdown => return,
            },
        };
        if payload.is_empty() {
            continue;
        }
        let step = r.handle(&payload);
        tokio::pin!(step);
        loop {
            tokio::select! {
                _ = &mut step => break,
                p = documents.recv() => match p {
                    // The same document again (retained, or re-sent when the device came
                    // back online): the step goes on.
                    Some(p) if p.payload[..] == payload[..] => continue,
                    Some(p) => {
                        info!("a rollout document arrived; the step in progress is left");
                        pending = Some(p.payload.to_vec());
                        break;
                    }
                    None => return,
                },
                _ = &mut shutdown => return,
            }
        }
    }
}

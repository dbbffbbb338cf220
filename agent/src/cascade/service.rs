//! The cascade service: one validated input in, one [`Outcome`] out.
//!
//! The sequence for every request: run the edge model, compute the confidence under the policy
//! in force, then either answer locally (and, at the configured audit rate, send the input to
//! the cloud in the background to label the evidence) or escalate and wait at most the
//! escalation timeout, falling back to the edge's answer. Counters, latency stages and the
//! tuner's evidence are recorded here, so a second front end records the same things.
//!
//! It depends on [`EdgeModel`] and [`Escalate`] only, so the tests below drive every tier and
//! every fallback reason with fakes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tierd_protocol::{EscalationKind, LatencySeries, Tensor};
use tierd_runtime::{InputError, Prediction};
use tokio::sync::watch;

use super::rule::{self, Answer, Signal};
use crate::escalation::Escalate;
use crate::evidence::Evidence;
use crate::policy::Policy;
use crate::rollout::shadow::{Pair, Shadow};
use crate::telemetry::Recorder;

/// The edge model as the cascade sees it; [`tierd_runtime::Model`] in production. Cheap to
/// clone (the cascade hands a copy to each request, so a rollout can switch models between
/// requests).
pub trait EdgeModel: Clone + Send + Sync + 'static {
    /// `name:version`, sent with escalations so the relay knows what answered first.
    fn id(&self) -> String;
    fn predict(&self, input: &Tensor) -> Result<Prediction, InputError>;
}

impl EdgeModel for tierd_runtime::Model {
    fn id(&self) -> String {
        tierd_runtime::Model::id(self)
    }

    fn predict(&self, input: &Tensor) -> Result<Prediction, InputError> {
        tierd_runtime::Model::predict(self, input)
    }
}

/// What the cascade decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The answer the caller gets: tier, probabilities, fallback reason.
    pub answer: Answer,
    /// The edge model's confidence under `signal`.
    pub confidence: f32,
    /// The threshold and signal in force when the request was decided.
    pub threshold: f32,
    pub signal: Signal,
    /// Wall time of the edge forward pass.
    pub edge_compute: Duration,
    /// Time spent waiting for the cloud, if the request was escalated.
    pub escalation: Option<Duration>,
}

/// Audits are not waited on by anyone, so they may take longer than a caller would.
const MIN_AUDIT_TIMEOUT: Duration = Duration::from_secs(2);

/// The model serving and the candidate shadowing it, if any: swapped between requests by a
/// rollout (`crate::rollout`), read by every request.
pub struct Serving<M> {
    model: RwLock<M>,
    shadow: RwLock<Option<Arc<Shadow<M>>>>,
}

impl<M: EdgeModel> Serving<M> {
    pub fn new(model: M) -> Self {
        Serving {
            model: RwLock::new(model),
            shadow: RwLock::new(None),
        }
    }

    /// The model serving now.
    pub fn model(&self) -> M {
        match self.model.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Serves `model` from the next request on (requests in flight finish on the old one).
    pub fn switch(&self, model: M) {
        match self.model.write() {
            Ok(mut m) => *m = model,
            Err(p) => *p.into_inner() = model,
        }
    }

    pub fn shadow(&self) -> Option<Arc<Shadow<M>>> {
        self.shadow.read().ok().and_then(|s| s.clone())
    }

    pub fn set_shadow(&self, shadow: Option<Arc<Shadow<M>>>) {
        if let Ok(mut s) = self.shadow.write() {
            *s = shadow;
        }
    }
}

/// The cascade over an edge model `M` and a cloud path `E`.
pub struct Cascade<M, E> {
    serving: Arc<Serving<M>>,
    escalator: Arc<E>,
    policy: watch::Receiver<Policy>,
    evidence: Arc<Evidence>,
    recorder: Arc<Recorder>,
}

impl<M: EdgeModel, E: Escalate> Cascade<M, E> {
    pub fn new(
        model: M,
        escalator: E,
        policy: watch::Receiver<Policy>,
        evidence: Arc<Evidence>,
        recorder: Arc<Recorder>,
    ) -> Self {
        Cascade {
            serving: Arc::new(Serving::new(model)),
            escalator: Arc::new(escalator),
            policy,
            evidence,
            recorder,
        }
    }

    /// The model serving now.
    pub fn model(&self) -> M {
        self.serving.model()
    }

    /// What a rollout switches and shadows.
    pub fn serving(&self) -> Arc<Serving<M>> {
        self.serving.clone()
    }

    pub fn escalator(&self) -> &E {
        &self.escalator
    }

    /// Runs the cascade for one input. `started` is when the request arrived (for the per-path
    /// latency). An input the model refuses is an error; every cloud failure is a fallback.
    pub async fn infer(&self, input: Tensor, started: Instant) -> Result<Outcome, InputError> {
        let model = self.serving.model();
        let edge = model.predict(&input)?;
        let recorder = &self.recorder;
        recorder.record(LatencySeries::StageForward, edge.compute);

        let policy = *self.policy.borrow();
        let confidence = rule::confidence(&edge.probabilities, policy.signal);
        let escalate = rule::should_escalate(confidence, policy.threshold);
        let edge_top1 = rule::top1(&edge.probabilities);
        // A candidate in shadow sees a copy of a sampled request, off the request path.
        let shadow = self
            .serving
            .shadow()
            .filter(|s| s.sample())
            .map(|s| (s, input.clone()));
        let (cloud, escalation) = if escalate {
            let t = Instant::now();
            let r = self
                .escalator
                .ask(
                    EscalationKind::Escalation,
                    input,
                    model.id(),
                    edge.probabilities.clone(),
                    policy.escalation_timeout,
                )
                .await;
            let took = t.elapsed();
            recorder.record(LatencySeries::StageEscalation, took);
            let agree = r.as_ref().ok().map(|p| rule::top1(p) == edge_top1);
            self.evidence
                .record_escalated(confidence, policy.threshold, agree);
            if let (Some((s, copy)), Ok(cloud)) = (shadow, &r) {
                spawn_shadow(
                    s,
                    copy,
                    confidence,
                    edge_top1,
                    policy.signal,
                    Label::<E>::Known(rule::top1(cloud)),
                );
            }
            (Some(r), Some(took))
        } else {
            self.evidence.record_local(confidence, policy.threshold);
            if let Some((s, copy)) = shadow {
                let ask = Label::Ask {
                    escalator: self.escalator.clone(),
                    model: model.id(),
                    edge: edge.probabilities.clone(),
                    timeout: policy.escalation_timeout.max(MIN_AUDIT_TIMEOUT),
                };
                spawn_shadow(s, copy, confidence, edge_top1, policy.signal, ask);
            }
            if self.evidence.should_audit() {
                self.spawn_audit(input, &model.id(), &edge.probabilities, confidence, &policy);
            }
            (None, None)
        };
        let answer = rule::resolve(edge.probabilities, cloud);
        recorder.counters.count(answer.tier);
        if let Some(reason) = &answer.fallback {
            recorder.counters.count_fallback(reason);
        }
        recorder.record_path(answer.tier, started.elapsed());
        Ok(Outcome {
            answer,
            confidence,
            threshold: policy.threshold,
            signal: policy.signal,
            edge_compute: edge.compute,
            escalation,
        })
    }

    /// Sends a locally answered request to the cloud in the background and records whether the
    /// cloud agreed. The caller already has its answer; a failed audit is simply not counted.
    fn spawn_audit(
        &self,
        input: Tensor,
        model: &str,
        edge: &[f32],
        confidence: f32,
        policy: &Policy,
    ) {
        let escalator = self.escalator.clone();
        let evidence = self.evidence.clone();
        let recorder = self.recorder.clone();
        let model = model.to_string();
        let probs = edge.to_vec();
        let edge_top1 = rule::top1(&probs);
        let timeout = policy.escalation_timeout.max(MIN_AUDIT_TIMEOUT);
        tokio::spawn(async move {
            if let Ok(cloud) = escalator
                .ask(EscalationKind::Audit, input, model, probs, timeout)
                .await
            {
                recorder.counters.audits.fetch_add(1, Ordering::Relaxed);
                evidence.record_audit(confidence, rule::top1(&cloud) == edge_top1);
            }
        });
    }
}

/// Where a shadowed request's cloud label comes from.
enum Label<E> {
    /// The serving model escalated it: the cloud's top class.
    Known(usize),
    /// It was answered locally: ask the cloud in the background (an audit).
    Ask {
        escalator: Arc<E>,
        model: String,
        edge: Vec<f32>,
        timeout: Duration,
    },
}

/// Runs the candidate on a copy of a sampled request and records the pair once the cloud's
/// label is known; never waited on by the caller. A request without a label (the cloud did
/// not answer) or that the candidate refuses is not counted.
fn spawn_shadow<M: EdgeModel, E: Escalate>(
    shadow: Arc<Shadow<M>>,
    input: Tensor,
    current_confidence: f32,
    current_top1: usize,
    signal: Signal,
    label: Label<E>,
) {
    tokio::spawn(async move {
        let Ok(candidate) = shadow.candidate.predict(&input) else {
            return;
        };
        let cloud_top1 = match label {
            Label::Known(c) => c,
            Label::Ask {
                escalator,
                model,
                edge,
                timeout,
            } => match escalator
                .ask(EscalationKind::Audit, input, model, edge, timeout)
                .await
            {
                Ok(cloud) => rule::top1(&cloud),
                Err(_) => return,
            },
        };
        shadow.record(Pair {
            current_confidence,
            current_agrees: current_top1 == cloud_top1,
            candidate_confidence: rule::confidence(&candidate.probabilities, signal),
            candidate_agrees: rule::top1(&candidate.probabilities) == cloud_top1,
        });
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tierd_protocol::{ReplyErrorCode, TensorData};

    use super::*;
    use crate::cascade::{CloudResult, FallbackReason, Tier};

    /// An edge model that answers fixed probabilities, or refuses inputs of the wrong length.
    #[derive(Clone)]
    struct FakeModel(Vec<f32>);

    impl EdgeModel for FakeModel {
        fn id(&self) -> String {
            "fake:1".into()
        }

        fn predict(&self, input: &Tensor) -> Result<Prediction, InputError> {
            if input.shape != [1, 2] {
                return Err(InputError::Batch(input.shape[0]));
            }
            Ok(Prediction {
                probabilities: self.0.clone(),
                compute: Duration::from_micros(7),
            })
        }
    }

    /// A cloud path that answers what it was told, and remembers what it was asked.
    struct FakeCloud {
        result: CloudResult,
        asked: Mutex<Vec<(EscalationKind, String, Duration)>>,
    }

    impl Escalate for FakeCloud {
        async fn ask(
            &self,
            kind: EscalationKind,
            _input: Tensor,
            edge_model: String,
            _edge: Vec<f32>,
            timeout: Duration,
        ) -> CloudResult {
            self.asked.lock().unwrap().push((kind, edge_model, timeout));
            self.result.clone()
        }
    }

    fn input() -> Tensor {
        Tensor {
            shape: vec![1, 2],
            data: TensorData::U8(vec![1, 2]),
        }
    }

    fn policy(threshold: f32, audit_rate: f64) -> Policy {
        Policy {
            threshold,
            signal: Signal::MaxProb,
            escalation_timeout: Duration::from_millis(50),
            audit_rate,
            telemetry_interval: Duration::from_secs(10),
            config_version: 0,
        }
    }

    fn cascade(edge: Vec<f32>, cloud: CloudResult, p: Policy) -> Cascade<FakeModel, FakeCloud> {
        Cascade::new(
            FakeModel(edge),
            FakeCloud {
                result: cloud,
                asked: Mutex::new(Vec::new()),
            },
            watch::channel(p).1,
            Arc::new(Evidence::new(p.audit_rate, 1000)),
            Arc::new(Recorder::new(true)),
        )
    }

    fn asked(c: &Cascade<FakeModel, FakeCloud>) -> Vec<(EscalationKind, String, Duration)> {
        c.escalator.asked.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_confident_answer_stays_at_the_edge() {
        let c = cascade(vec![0.95, 0.05], Ok(vec![0.0, 1.0]), policy(0.9, 0.0));
        let o = c.infer(input(), Instant::now()).await.unwrap();
        assert_eq!(o.answer.tier, Tier::Edge);
        assert_eq!(o.answer.probabilities, vec![0.95, 0.05]);
        assert_eq!((o.confidence, o.threshold, o.escalation), (0.95, 0.9, None));
        assert!(asked(&c).is_empty(), "nothing went to the cloud");
        let counts = c.recorder.counters.tiers();
        assert_eq!((counts.edge, counts.cloud), (1, 0));
        let bins = c.evidence.take_window().bins;
        assert_eq!(bins.iter().map(|b| b.local).sum::<u64>(), 1);
        assert_eq!(bins.iter().map(|b| b.escalated).sum::<u64>(), 0);
    }

    #[tokio::test]
    async fn an_unsure_answer_goes_to_the_cloud_and_its_agreement_is_evidence() {
        let c = cascade(vec![0.6, 0.4], Ok(vec![0.1, 0.9]), policy(0.9, 0.0));
        let o = c.infer(input(), Instant::now()).await.unwrap();
        assert_eq!(o.answer.tier, Tier::Cloud);
        assert_eq!(o.answer.probabilities, vec![0.1, 0.9]);
        assert_eq!(o.answer.fallback, None);
        assert!(o.escalation.is_some());
        assert_eq!(
            asked(&c),
            vec![(
                EscalationKind::Escalation,
                "fake:1".to_string(),
                Duration::from_millis(50)
            )]
        );
        assert_eq!(c.recorder.counters.tiers().cloud, 1);
        let bins = c.evidence.take_window().bins;
        assert_eq!(bins.iter().map(|b| b.escalated).sum::<u64>(), 1);
        assert_eq!(
            bins.iter().map(|b| b.escalated_agree).sum::<u64>(),
            0,
            "edge said 0, cloud said 1"
        );
    }

    #[tokio::test]
    async fn every_fallback_reason_answers_with_the_edge() {
        let reasons = [
            FallbackReason::Timeout,
            FallbackReason::Disconnected,
            FallbackReason::Overload,
            FallbackReason::PublishFailed,
            FallbackReason::RelayError(ReplyErrorCode::UnknownModel),
            FallbackReason::RelayError(ReplyErrorCode::Overloaded),
        ];
        for reason in reasons {
            let c = cascade(vec![0.6, 0.4], Err(reason), policy(0.9, 0.0));
            let o = c.infer(input(), Instant::now()).await.unwrap();
            assert_eq!(o.answer.tier, Tier::EdgeFallback, "{reason:?}");
            assert_eq!(o.answer.probabilities, vec![0.6, 0.4]);
            assert_eq!(o.answer.fallback.as_ref(), Some(&reason));
            assert_eq!(c.recorder.counters.tiers().edge_fallback, 1);
            let bins = c.evidence.take_window().bins;
            assert_eq!(bins.iter().map(|b| b.escalated).sum::<u64>(), 1);
        }
        // A cloud answer of the wrong length is not passed on.
        let c = cascade(vec![0.6, 0.4], Ok(vec![1.0]), policy(0.9, 0.0));
        let o = c.infer(input(), Instant::now()).await.unwrap();
        assert_eq!(o.answer.tier, Tier::EdgeFallback);
        assert_eq!(
            o.answer.fallback,
            Some(FallbackReason::RelayError(ReplyErrorCode::BadShape))
        );
        let f = c.recorder.counters.fallbacks();
        assert_eq!(f.relay_error, 1);
    }

    #[tokio::test]
    async fn local_answers_are_audited_at_the_audit_rate_with_a_longer_timeout() {
        let c = cascade(vec![0.95, 0.05], Ok(vec![0.9, 0.1]), policy(0.9, 1.0));
        let o = c.infer(input(), Instant::now()).await.unwrap();
        assert_eq!(o.answer.tier, Tier::Edge, "the caller is answered locally");
        // The audit runs in the background.
        for _ in 0..100 {
            if c.recorder.counters.audits.load(Ordering::Relaxed) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(c.recorder.counters.audits.load(Ordering::Relaxed), 1);
        assert_eq!(
            asked(&c),
            vec![(
                EscalationKind::Audit,
                "fake:1".to_string(),
                MIN_AUDIT_TIMEOUT
            )]
        );
        let bins = c.evidence.take_window().bins;
        assert_eq!(bins.iter().map(|b| b.audited).sum::<u64>(), 1);
        assert_eq!(bins.iter().map(|b| b.audited_agree).sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn an_input_the_model_refuses_is_an_error_and_counts_nothing() {
        let c = cascade(vec![0.95, 0.05], Ok(vec![0.9, 0.1]), policy(0.9, 0.0));
        let bad = Tensor {
            shape: vec![3, 2],
            data: TensorData::U8(vec![0; 6]),
        };
        assert_eq!(
            c.infer(bad, Instant::now()).await.unwrap_err(),
            InputError::Batch(3)
        );
        let counts = c.recorder.counters.tiers();
        assert_eq!(counts.edge + counts.cloud + counts.edge_fallback, 0);
    }
}

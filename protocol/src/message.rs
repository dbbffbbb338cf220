//! Messages exchanged over MQTT. Plain data; validation that needs no context lives here too.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest number of elements a tensor on the wire may carry (a 256x256x3 image fits).
pub const MAX_TENSOR_ELEMENTS: usize = 256 * 256 * 3;
/// Largest rank accepted.
pub const MAX_TENSOR_RANK: usize = 8;

/// Tensor payload in its native element type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TensorData {
    /// Raw sensor values (e.g. pixels); the receiver applies its model's preprocessing.
    U8(Vec<u8>),
    /// Values already in the model's input space; used as they are.
    F32(Vec<f32>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::U8(v) => v.len(),
            TensorData::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Open Inference Protocol name of the element type.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::U8(_) => "UINT8",
            TensorData::F32(_) => "FP32",
        }
    }
}

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub shape: Vec<u32>,
    pub data: TensorData,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("tensor rank {0} exceeds the limit of {MAX_TENSOR_RANK}")]
    RankTooLarge(usize),
    #[error("tensor shape {shape:?} holds {expected} elements but {got} were sent")]
    ElementCount {
        shape: Vec<u32>,
        expected: u64,
        got: usize,
    },
    #[error("tensor holds {0} elements; the limit is {MAX_TENSOR_ELEMENTS}")]
    TooLarge(u64),
    #[error("tensor contains a non-finite value at index {0}")]
    NonFinite(usize),
}

impl Tensor {
    /// Checks rank, size, element count against the shape and that floats are finite.
    pub fn validate(&self) -> Result<(), TensorError> {
        if self.shape.len() > MAX_TENSOR_RANK {
            return Err(TensorError::RankTooLarge(self.shape.len()));
        }
        let expected = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
            .unwrap_or(u64::MAX);
        if expected > MAX_TENSOR_ELEMENTS as u64 {
            return Err(TensorError::TooLarge(expected));
        }
        if expected != self.data.len() as u64 {
            return Err(TensorError::ElementCount {
                shape: self.shape.clone(),
                expected,
                got: self.data.len(),
            });
        }
        if let TensorData::F32(v) = &self.data {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(TensorError::NonFinite(i));
            }
        }
        Ok(())
    }
}

/// Why a request reached the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EscalationKind {
    /// The edge was unsure; a caller is waiting for this answer.
    Escalation,
    /// A confident request sampled to measure the edge's error rate; nobody waits on it.
    Audit,
}

/// Agent → relay on `tierd/v1/{device}/escalate/{edge model name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscalationRequest {
    /// Unique per agent process and echoed in the reply (also sent as MQTT v5 correlation data).
    pub request_id: u64,
    pub kind: EscalationKind,
    /// The edge model that was unsure, `name@version`; lets the relay pick a matching cloud model.
    pub edge_model: String,
    /// How long the agent will wait, so the relay can skip work whose caller has gone.
    pub deadline_ms: u32,
    /// The request's input exactly as the client sent it (native dtype).
    pub input: Tensor,
    /// The edge's probabilities, so the relay can record agreement without a second message.
    pub edge_probabilities: Vec<f32>,
}

/// Machine-readable failure classes in an [`EscalationReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplyErrorCode {
    /// The payload could not be decoded or failed validation.
    BadRequest,
    /// The relay has no model for this edge model.
    UnknownModel,
    /// The input's shape or dtype does not fit the cloud model.
    BadShape,
    /// The cloud model failed while running.
    Internal,
    /// The relay is shedding load.
    Overloaded,
}

/// The outcome of an escalation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplyOutcome {
    Answer {
        /// `name@version` of the cloud model that answered.
        model: String,
        probabilities: Vec<f32>,
        /// Time the relay spent running the model, in microseconds.
        compute_us: u32,
    },
    Error {
        code: ReplyErrorCode,
        message: String,
    },
}

/// Relay → agent on `tierd/v1/{device}/reply` (or the request's MQTT v5 response topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscalationReply {
    pub request_id: u64,
    pub outcome: ReplyOutcome,
}

/// Agent → anyone on `tierd/v1/{device}/status`, QoS 1, retained. The offline form is also the
/// agent's MQTT last will, which the broker publishes when the connection dies without a clean
/// DISCONNECT (crash, power loss, network gone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub online: bool,
    /// The agent run this is about (same as the telemetry reports' `boot_id`).
    pub boot_id: u64,
    /// For offline: `stopped` (clean shutdown) or `connection lost` (the last will).
    pub reason: String,
    /// Online: the model the agent runs (`name@version`) and the threshold certified offline
    /// in its manifest, if any. The relay re-derives the certificate's bound before using it.
    pub model: Option<ModelCalibration>,
    /// Online: the further models the agent serves (`[[models]]`), with their offline
    /// certificates; the relay files calibration evidence only for models announced here or
    /// in the telemetry report.
    pub models: Vec<ServedModel>,
    /// Which machine the agent runs on: an id derived from `/etc/machine-id` (a keyed hash, so
    /// the machine id itself never leaves the board), or `None` where there is none. Two boards
    /// cloned from one SD image announce one `device_id` from two machines; the relay warns.
    pub machine: Option<String>,
}

/// A further model an agent serves, as its status announces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedModel {
    /// `name@version`.
    pub model: String,
    pub calibration: Option<ModelCalibration>,
}

/// A model's offline-certified threshold, as its manifest's `[calibration]` table states it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCalibration {
    /// `name@version` of the edge model.
    pub model: String,
    pub threshold: f32,
    pub target: f64,
    pub delta: f64,
    pub samples: u64,
    pub disagreements: u64,
    pub agreement_lower_bound: f64,
    pub escalation_rate: f64,
    /// `name@version` of the reference (cloud) model.
    pub reference: String,
}

/// What a spooled record is; the relay dispatches the envelope's body on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    Telemetry,
    Calibration,
    ConfigAck,
    /// A [`crate::RolloutAck`].
    RolloutAck,
    /// A [`crate::ShadowReport`].
    Shadow,
}

impl RecordKind {
    pub const ALL: [RecordKind; 5] = [
        RecordKind::Telemetry,
        RecordKind::Calibration,
        RecordKind::ConfigAck,
        RecordKind::RolloutAck,
        RecordKind::Shadow,
    ];

    /// The byte the agent's spool stores for this kind.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.get(usize::from(b)).copied()
    }
}

/// Agent → relay: one record of the agent's on-disk spool, on `telemetry` (telemetry and
/// calibration reports) or `config/ack` (config acks), QoS 1.
///
/// `seq` numbers the records of one spool (`stream_id`) contiguously, across agent restarts;
/// the relay delivers each `(device, stream_id, seq)` once and acknowledges cumulatively on
/// `tierd/v1/{device}/ack`. Records below `floor` will never be sent again (already
/// acknowledged, or dropped at the spool's size cap), so the relay need not wait for them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spooled {
    pub stream_id: u64,
    pub seq: u64,
    pub floor: u64,
    pub kind: RecordKind,
    /// The record itself, encoded with its own header (a `TelemetryReport`, ...).
    pub body: Vec<u8>,
}

/// Relay → agent on `tierd/v1/{device}/ack`, QoS 1: every record of `stream_id` with
/// `seq <= upto` has been delivered; the agent may delete them from its spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolAck {
    pub stream_id: u64,
    pub upto: u64,
}

/// Agent → relay on `tierd/v1/{device}/config/ack` (through the spool): what became of a
/// config document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigAck {
    pub version: u64,
    pub applied: bool,
    /// Why it was rejected (empty when applied).
    pub reason: String,
    /// The version in force after this document was handled.
    pub in_force: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<u32>, data: TensorData) -> Tensor {
        Tensor { shape, data }
    }

    #[test]
    fn validates_element_count_and_limits() {
        assert!(t(vec![1, 64], TensorData::U8(vec![0; 64]))
            .validate()
            .is_ok());
        assert_eq!(
            t(vec![1, 64], TensorData::U8(vec![0; 63])).validate(),
            Err(TensorError::ElementCount {
                shape: vec![1, 64],
                expected: 64,
                got: 63
            })
        );
        assert!(matches!(
            t(vec![u32::MAX, u32::MAX, u32::MAX], TensorData::U8(vec![])).validate(),
            Err(TensorError::TooLarge(_))
        ));
        assert!(matches!(
            t(vec![1; 9], TensorData::U8(vec![0])).validate(),
            Err(TensorError::RankTooLarge(9))
        ));
        assert_eq!(
            t(vec![2], TensorData::F32(vec![0.0, f32::NAN])).validate(),
            Err(TensorError::NonFinite(1))
        );
    }
}

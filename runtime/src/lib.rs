//! What both daemons run: verified models ([`Model`]), the MQTT connection ([`mqtt`]), the
//! systemd notify protocol ([`systemd`]) and the state directory ([`state`]).
//!
//! A model file is not trusted: [`Model::load`] checks its sha256 against the manifest, compiles it
//! with tract into an optimized plan once, then runs every golden vector and refuses the model if
//! any output differs. That last check exists because a QDQ model quantized with onnxruntime's
//! defaults loads fine in tract yet answers 1.0 for every class; only running it shows that.

pub mod cli;
pub mod config;
pub mod keyfile;
pub mod link;
pub mod logging;
mod manifest;
pub mod metrics;
mod model;
pub mod mqtt;
pub mod state;
pub mod stream;
pub mod systemd;

pub use logging::{error_chain, init_logging};
pub use manifest::{
    not_probabilities, softmax, Dtype, Golden, InputSpec, Manifest, OutputKind, OutputSpec,
    Preprocess,
};
pub use model::{
    inspect_graph, sha256_hex, signature_path, Graph, GraphTensor, InputError, Model, ModelError,
    Prediction,
};

/// Wall-clock time as Unix milliseconds (0 if the clock is before 1970): the timestamps and
/// boot ids both daemons put on the wire.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Resolves on SIGTERM or Ctrl-C: the signal both daemons drain on.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}

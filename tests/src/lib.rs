//! End-to-end test support: runs the real `edge-agent` and `cloud-relay` binaries (and Mosquitto)
//! as child processes, each with its own config and log file in a temporary directory.
//!
//! - The binaries are taken from the target directory the test executable lives in, so
//!   `cargo build --workspace --bins && cargo test --workspace` tests what was just built.
//! - Every process is killed when its guard is dropped, also when a test panics; a panicking test
//!   prints the tail of each process's log, so a failure explains itself.
//! - Every wait is bounded; nothing here depends on speed beyond generous limits.
//!
//! Modules: [`fixtures`] (models, examples, config paths), [`processes`] (spawning the binaries,
//! logs), [`brokers`] (embedded broker or Mosquitto), [`relay`] and [`agent`] (the two daemons),
//! [`clients`] (HTTP and MQTT clients), [`signing`] (the relays' config-signing key). Everything the suites use is re-exported here.

pub mod agent;
pub mod brokers;
pub mod clients;
pub mod fixtures;
pub mod oip_server;
pub mod postgres;
pub mod processes;
pub mod relay;
pub mod releases;
pub mod signing;

pub use agent::{assert_concurrent_cloud_answers, AgentOptions, AgentProc};
pub use brokers::{
    chmod, mosquitto_binary, shipped_mosquitto_conf, start_mosquitto, start_mosquitto_conf,
    start_mosquitto_shipped, Mosquitto, Pki, RelayBroker, MOSQUITTO_BIN_ENV,
};
pub use clients::{http_client, infer_body, InferResult, TestClient};
/// Index of the largest value (first on ties): the agent's own function.
pub use edge_agent::cascade::top1;
pub use fixtures::{
    assert_probs_close, breast_rows, cloud_manifest, confident_examples, edge_manifest, example,
    examples, repo_root, uncalibrated_manifest, unsure_examples, Example, AGENT_MQTT_READY,
    EDGE_MODEL, HTTP_TIMEOUT, READY_TIMEOUT, RELAY_READY, RUST_LOG, SKIP_MOSQUITTO_ENV,
};
pub use oip_server::OipServer;
pub use postgres::{Postgres, SKIP_POSTGRES_ENV};
pub use processes::{bin_path, daemon_command, free_port, rss_bytes, Proc};
pub use relay::RelayProc;
pub use tierd_devkit::port_accepts;

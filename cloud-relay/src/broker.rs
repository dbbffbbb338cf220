//! The embedded broker: rumqttd on its own threads, for zero-setup use.
//!
//! rumqttd keeps sessions and retained messages in memory only, has no ACLs, and never sets
//! TCP_NODELAY on its sockets. It is the default so that `cargo run` works on a fresh machine;
//! production fleets should point the relay and agents at Mosquitto (or another broker) with TLS
//! and per-device ACLs.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use thiserror::Error;
use tracing::{error, info};

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("embedded broker cannot listen on {addr}: {source} (is another broker running? set embedded_broker.listen or configure [mqtt])")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("embedded_broker.listen = {addr} is not a loopback address: the embedded broker has no TLS, no authentication and no ACL, so it only listens on 127.0.0.1 or ::1; for a broker other hosts reach, run Mosquitto (cross/mosquitto/) and configure [mqtt]")]
    NotLoopback { addr: SocketAddr },
    #[error("embedded broker failed to start: {0}")]
    Start(String),
}

/// Largest publish the embedded broker accepts; matches the clients' packet cap.
const MAX_PAYLOAD: usize = tierd_runtime::mqtt::MAX_PACKET_BYTES as usize;

/// Refuses a listen address other hosts could reach: the embedded broker has no auth at all.
pub fn check_listen(listen: SocketAddr) -> Result<(), BrokerError> {
    if listen.ip().is_loopback() {
        Ok(())
    } else {
        Err(BrokerError::NotLoopback { addr: listen })
    }
}

/// Starts rumqttd listening on `listen` (MQTT v5). Returns once its threads are running.
pub fn start(listen: SocketAddr) -> Result<(), BrokerError> {
    check_listen(listen)?;
    // rumqttd reports a bind failure only in its own log from its own thread; probe first so the
    // operator gets an error that says what is wrong.
    std::net::TcpListener::bind(listen)
        .map_err(|e| BrokerError::Bind {
            addr: listen,
            source: e,
        })
        .map(drop)?;
    let server = ServerSettings {
        name: "tierd-embedded-v5".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            // rumqttd keeps every publish in a per-filter in-memory log until the oldest segment
            // is evicted; tierd needs only live delivery, so keep that log small. With rumqttd's
            // example values (100 MiB x 10) the relay grew ~0.8 KiB per escalation, unbounded.
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v5: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    info!(%listen, "embedded MQTT broker (rumqttd; in-memory, no auth: for development)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_broker_listens_on_loopback_only() {
        for ok in ["127.0.0.1:1883", "[::1]:1883", "127.0.0.1:0"] {
            assert!(check_listen(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for bad in ["0.0.0.0:1883", "[::]:1883", "192.168.1.10:1883"] {
            let addr: SocketAddr = bad.parse().unwrap();
            let err = start(addr).unwrap_err().to_string();
            assert!(err.contains("embedded_broker.listen"), "{err}");
            assert!(err.contains("[mqtt]"), "{err}");
        }
    }
}

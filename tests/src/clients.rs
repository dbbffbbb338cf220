//! Clients of the daemons: HTTP (Open Inference Protocol requests and their answers) and a
//! foreign MQTT client.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fixtures::{HTTP_TIMEOUT, READY_TIMEOUT};

/// A client with bounded timeouts for talking to an agent.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build()
        .expect("cannot build the HTTP client")
}

/// The JSON body of an inference request for one 8x8 UINT8 input.
pub fn infer_body(pixels: &[u8]) -> Value {
    json!({
        "inputs": [{
            "name": "input",
            "shape": [1, pixels.len()],
            "datatype": "UINT8",
            "data": pixels,
        }]
    })
}

/// A response to `POST /v2/models/{name}/infer`.
#[derive(Debug, Clone)]
pub struct InferResult {
    pub status: u16,
    pub body: Value,
    /// Wall time of the whole HTTP exchange, as the client saw it.
    pub elapsed: Duration,
}

impl InferResult {
    /// `parameters.tier` (`""` when absent).
    pub fn tier(&self) -> &str {
        self.body["parameters"]["tier"].as_str().unwrap_or("")
    }

    /// `parameters.fallback_reason`, if any.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.body["parameters"]["fallback_reason"].as_str()
    }

    /// `parameters.confidence`.
    pub fn confidence(&self) -> f64 {
        self.body["parameters"]["confidence"]
            .as_f64()
            .unwrap_or_else(|| panic!("no parameters.confidence in {}", self.body))
    }

    /// `outputs[0].data` as probabilities.
    pub fn probabilities(&self) -> Vec<f32> {
        self.body["outputs"][0]["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no outputs[0].data in {}", self.body))
            .iter()
            .map(|v| {
                v.as_f64()
                    .unwrap_or_else(|| panic!("non-number {v} in outputs[0].data"))
                    as f32
            })
            .collect()
    }

    /// `error` of an error response (`""` when absent).
    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }

    /// Panics unless the status is 200 and the answer came from `tier`.
    pub fn assert_ok_from(&self, tier: &str, what: &str) {
        assert_eq!(
            self.status, 200,
            "{what}: status {}: {}",
            self.status, self.body
        );
        assert_eq!(self.tier(), tier, "{what}: wrong tier in {}", self.body);
    }
}

pub(crate) async fn read_response(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("cannot read the response body: {e}"));
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

/// An MQTT v5 client of the test itself (not a tierd component), on 127.0.0.1:`port`.
pub struct TestClient {
    pub client: rumqttc::v5::AsyncClient,
    task: tokio::task::JoinHandle<()>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl TestClient {
    /// Connects and waits for the CONNACK.
    pub async fn connect(port: u16, client_id: &str) -> TestClient {
        let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(4 * 1024 * 1024));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(o, 1024);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            use rumqttc::v5::mqttbytes::v5::Packet;
            use rumqttc::v5::Event;
            let mut tx = Some(tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(READY_TIMEOUT, rx)
            .await
            .expect("test MQTT client: no CONNACK")
            .expect("test MQTT client task ended");
        TestClient {
            client,
            task,
            acked,
        }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        let before = self.acked.load(std::sync::atomic::Ordering::Relaxed);
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                retain,
                payload,
            )
            .await
            .expect("test MQTT client: publish");
        let start = Instant::now();
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) <= before {
            assert!(start.elapsed() < READY_TIMEOUT, "no PUBACK for {topic}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

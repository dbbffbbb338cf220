//! Fetching a candidate's file from the relay in chunks over the MQTT link (I/O).
//!
//! The download resumes from whatever is on disk (`store::have`): after a lost link, an agent
//! restart or a relay restart it asks for the range after the bytes it has. A few requests are
//! kept in flight; a chunk that does not come within [`CHUNK_TIMEOUT`] is asked for again, so a
//! dead broker just pauses the download until the link is back. Chunks are written in order;
//! nothing in them is trusted until the whole file's size and sha256 match (`store::finish`).

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use tierd_protocol::rollout::{ChunkBody, MAX_CHUNK_BYTES};
use tierd_protocol::{decode, encode, ModelChunk, ModelFetch};
use tierd_runtime::link::Publisher;
use tokio::sync::mpsc;
use tracing::debug;

use super::store::{self, Paths};

/// Requests in flight at once.
const WINDOW: u64 = 4;
/// How long to wait for a chunk before asking again.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(3);
/// The relay refusing this many times in a row ends the download.
const MAX_REFUSALS: u32 = 3;

/// Asks for chunks on the device's `model/fetch` topic and takes them from `chunks`.
pub struct Fetcher {
    pub publisher: Publisher,
    /// `tierd/v1/{device}/model/fetch`.
    pub topic: String,
    pub chunks: mpsc::Receiver<Publish>,
    /// Download rate cap, bytes per second (0: none).
    pub max_bytes_per_s: u64,
}

impl Fetcher {
    fn ask(&self, rollout_id: &str, sha256: &str, offset: u64, total: u64) {
        let len = (total - offset).min(u64::from(MAX_CHUNK_BYTES)) as u32;
        let req = ModelFetch {
            rollout_id: rollout_id.to_string(),
            sha256: sha256.to_string(),
            offset,
            len,
        };
        if let Ok(bytes) = encode(&req) {
            if let Err(e) = self
                .publisher
                .try_publish(&self.topic, QoS::AtMostOnce, false, bytes)
            {
                debug!(offset, error = %e, "model fetch not queued; asked again later");
            }
        }
    }

    /// Downloads the file into `paths.part` until it is `total` bytes; `progress` is told the
    /// bytes on disk now and then. Cancel-safe: dropping the future keeps what was written.
    pub async fn fetch(
        &mut self,
        rollout_id: &str,
        sha256: &str,
        total: u64,
        paths: &Paths,
        mut progress: impl FnMut(u64),
    ) -> Result<(), String> {
        let chunk = u64::from(MAX_CHUNK_BYTES);
        let mut have = store::have(paths, total);
        if have < total && !have.is_multiple_of(chunk) {
            // A partial chunk on disk: resume at the last whole one.
            have -= have % chunk;
            store::truncate_part(paths, have)?;
        }
        // Chunks ahead of `have` (arrived out of order), and the next offset to ask for.
        let mut ahead: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut next = have;
        let mut refusals = 0;
        let mut reported = have;
        // Reset when a chunk moves the download on: messages that do not cannot hold it off.
        let mut deadline = tokio::time::Instant::now() + CHUNK_TIMEOUT;
        let started = tokio::time::Instant::now();
        let from = have;
        while have < total {
            // The rate cap: wait until the bytes fetched so far are within it.
            if self.max_bytes_per_s > 0 {
                let due =
                    Duration::from_secs_f64((have - from) as f64 / self.max_bytes_per_s as f64);
                tokio::time::sleep_until(started + due).await;
            }
            let window = if self.max_bytes_per_s > 0 { 1 } else { WINDOW };
            while next < total && next < have + window * chunk {
                if !ahead.contains_key(&next) {
                    self.ask(rollout_id, sha256, next, total);
                }
                next += chunk;
            }
            let c = tokio::select! {
                p = self.chunks.recv() => match p {
                    Some(p) => match decode::<ModelChunk>(&p.payload) {
                        Ok(c) => c,
                        Err(_) => continue,
                    },
                    None => return Err("the MQTT link has stopped".into()),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // Lost requests or chunks (or no link): ask for the window again.
                    next = have;
                    deadline = tokio::time::Instant::now() + CHUNK_TIMEOUT;
                    continue;
                }
            };
            if !c.sha256.eq_ignore_ascii_case(sha256) || c.offset < have || c.offset >= total {
                continue;
            }
            match c.body {
                ChunkBody::Error(why) => {
                    refusals += 1;
                    if refusals >= MAX_REFUSALS {
                        return Err(format!("the relay refuses the download: {why}"));
                    }
                    next = have;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                ChunkBody::Data(data) => {
                    refusals = 0;
                    if c.total != total {
                        return Err(format!(
                            "the relay serves a file of {} bytes, the rollout says {total}",
                            c.total
                        ));
                    }
                    let want = (total - c.offset).min(chunk);
                    // Only the window's chunks are kept: memory stays at a few chunks.
                    if !c.offset.is_multiple_of(chunk)
                        || data.len() as u64 != want
                        || c.offset >= have + WINDOW * chunk
                    {
                        continue;
                    }
                    ahead.insert(c.offset, data);
                    while let Some(data) = ahead.remove(&have) {
                        store::append(paths, have, &data)?;
                        have += data.len() as u64;
                        deadline = tokio::time::Instant::now() + CHUNK_TIMEOUT;
                    }
                    if have - reported >= total / 4 && have < total {
                        reported = have;
                        progress(have);
                    }
                }
            }
        }
        progress(have);
        Ok(())
    }
}

//! Serving the candidates' files to devices, in chunks (I/O): a [`ModelFetch`] on
//! `tierd/v1/{device}/model/fetch` is answered on `tierd/v1/{device}/model/chunk` with the
//! bytes asked for, or why not. A device gets only the file of the rollout it is in. A relay that
//! does not hold the rollout says nothing (another replica may): the device asks again after
//! its chunk timeout, and the shared subscription hands the request to another member.

use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::{Filter, Publish};
use rumqttc::v5::mqttbytes::QoS;
use tierd_protocol::rollout::ChunkBody;
use tierd_protocol::topic::{MODEL_SHARE_GROUP, PREFIX};
use tierd_protocol::{decode, encode, ModelChunk, ModelFetch, Topic, TopicKind};
use tierd_runtime::link::{Publisher, Routes};
use tracing::{debug, warn};

use crate::state::RelayState;

/// The shared-subscription filter model fetches arrive on (one relay answers each).
pub fn subscription() -> Filter {
    Filter::new(
        format!("$share/{MODEL_SHARE_GROUP}/{PREFIX}/+/model/fetch"),
        QoS::AtMostOnce,
    )
}

/// Routes model fetches to [`answer`] (on the link's task: a chunk is one small file read).
pub fn route(state: RelayState, client: Publisher, routes: &mut Routes) {
    routes.handler(
        TopicKind::ModelFetch,
        Arc::new(move |topic: Topic, p: Publish| answer(&state, &client, &topic, &p)),
    );
}

fn answer(state: &RelayState, client: &Publisher, topic: &Topic, p: &Publish) {
    let device = &topic.device_id;
    let req = match decode::<ModelFetch>(&p.payload) {
        Ok(r) => r,
        Err(e) => {
            warn!(%device, error = %e, "model fetch rejected");
            return;
        }
    };
    let reply = |total: u64, body: ChunkBody| ModelChunk {
        sha256: req.sha256.clone(),
        offset: req.offset,
        total,
        body,
    };
    let release = state.rollouts().ok().and_then(|r| {
        r.get(&req.rollout_id)
            .filter(|ro| ro.devices.contains_key(device))
            .map(|ro| ro.spec.candidate.clone())
    });
    let chunk = match (&release, &state.state_dir) {
        (Some(rel), Some(dir)) if rel.onnx_sha256.eq_ignore_ascii_case(&req.sha256) => {
            match super::store::read_chunk(dir, &req.rollout_id, rel, req.offset, req.len) {
                Ok((data, total)) => reply(total, ChunkBody::Data(data)),
                Err(why) => reply(rel.onnx_bytes, ChunkBody::Error(why)),
            }
        }
        (Some(rel), _) => reply(
            rel.onnx_bytes,
            ChunkBody::Error(format!(
                "rollout {} ships the file {}, not {}",
                req.rollout_id, rel.onnx_sha256, req.sha256
            )),
        ),
        // Another replica may drive this rollout: stay silent, so the device asks again and
        // the shared group hands the request to another member.
        (None, _) => {
            debug!(%device, rollout = %req.rollout_id.chars().take(80).collect::<String>(), "model fetch for a rollout this relay does not hold; left to the others");
            return;
        }
    };
    if let ChunkBody::Error(why) = &chunk.body {
        warn!(%device, rollout = %req.rollout_id, offset = req.offset, %why, "model chunk refused");
    } else {
        debug!(%device, offset = req.offset, "model chunk");
    }
    let Ok(reply_topic) = Topic::new(device, TopicKind::ModelChunk) else {
        return;
    };
    match encode(&chunk) {
        Ok(bytes) => {
            if let Err(e) =
                client.try_publish(&reply_topic.to_string(), QoS::AtMostOnce, false, bytes)
            {
                debug!(%device, error = %e, "model chunk not queued; the device asks again");
            }
        }
        Err(e) => warn!(%device, error = %e, "model chunk cannot be encoded"),
    }
}

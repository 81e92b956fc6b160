//! The replay result message (README "Replay results"): what a replay worker publishes to
//! the results exchange once the AI answered a dead letter, for Magento's queue consumer.

use super::{Envelope, ReplayAnswer};

/// The JSON body of one result message for `env`, answered with `answer` at `replayed_at`.
pub(crate) fn message(
    env: &Envelope,
    answer: &ReplayAnswer,
    replayed_at: &str,
) -> serde_json::Value {
    serde_json::json!({
        "msg_id": env.msg_id,
        "request_id": env.request_id,
        "route": env.route,
        "status": answer.status,
        "model_version": answer.model_version,
        "upstream": answer.upstream,
        "headers": answer.headers,
        "body_b64": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &answer.body),
        "replayed_at": replayed_at,
        "attempts": env.attempts + 1,
    })
}

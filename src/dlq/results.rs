//! The replay result message (README "Replay results"): what a replay worker publishes to
//! the results exchange once the AI answered a dead letter, for Magento's queue consumer.
//!
//! Shaped for Magento's `MessageEncoder`, which maps a JSON object onto a data interface:
//! `headers` is an object (lower-case names; repeated headers joined with ", " as HTTP
//! allows), the answer is `body` (text) when it is UTF-8 and `body_b64` otherwise, never
//! both. `schema_v` 2 tells this format from the first one (no `schema_v`, `headers` as
//! `[name, value]` pairs, always `body_b64`).

use super::{Envelope, ReplayAnswer};

/// The `schema_v` of the result messages published now.
pub(crate) const SCHEMA_V: u32 = 2;

/// The JSON body of one result message for `env`, answered with `answer` at `replayed_at`.
pub(crate) fn message(
    env: &Envelope,
    answer: &ReplayAnswer,
    replayed_at: &str,
) -> serde_json::Value {
    let mut m = serde_json::json!({
        "schema_v": SCHEMA_V,
        "msg_id": env.msg_id,
        "request_id": env.request_id,
        "route": env.route,
        "status": answer.status,
        "model_version": answer.model_version,
        "upstream": answer.upstream,
        "headers": header_object(&answer.headers),
        "replayed_at": replayed_at,
        "attempts": env.attempts + 1,
    });
    let body = match std::str::from_utf8(&answer.body) {
        Ok(text) => ("body", serde_json::Value::from(text)),
        Err(_) => (
            "body_b64",
            serde_json::Value::from(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                &answer.body,
            )),
        ),
    };
    if let Some(obj) = m.as_object_mut() {
        obj.insert(body.0.into(), body.1);
    }
    m
}

/// Header pairs as one JSON object: names lower-cased, a repeated header's values joined
/// with ", " in the order received.
fn header_object(pairs: &[(String, String)]) -> serde_json::Map<String, serde_json::Value> {
    let mut out: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for (name, value) in pairs {
        let name = name.to_ascii_lowercase();
        let joined = match out.get(&name).and_then(|v| v.as_str()) {
            Some(prev) => format!("{prev}, {value}"),
            None => value.clone(),
        };
        out.insert(name, serde_json::Value::from(joined));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn envelope() -> Envelope {
        Envelope {
            msg_id: "m-1".into(),
            route: "grading".into(),
            request_id: "r-1".into(),
            created_at: "2026-12-02T10:00:00Z".into(),
            reason: "upstream_5xx".into(),
            attempts: 0,
            method: "POST".into(),
            path: "/v1/grading".into(),
            query: None,
            headers: vec![],
            body_b64: String::new(),
            model_version_requested: None,
            trace_id: None,
            span_id: None,
        }
    }

    fn answer(body: &'static [u8]) -> ReplayAnswer {
        ReplayAnswer {
            status: 200,
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("x-model-version".into(), "grader-v3".into()),
                ("vary".into(), "accept".into()),
                ("Vary".into(), "x-student-id".into()),
            ],
            body: Bytes::from_static(body),
            model_version: Some("grader-v3".into()),
            upstream: "grader".into(),
            unapproved: false,
        }
    }

    /// What Magento's MessageEncoder maps onto a data interface: a JSON object of headers
    /// (lower-case names, repeated ones joined as HTTP allows) and the answer as text.
    #[test]
    fn a_utf8_answer_is_text_and_headers_are_an_object() {
        let m = message(&envelope(), &answer(b"{\"grade\":\"B+\"}"), "t");
        assert_eq!(m["schema_v"], 2);
        assert_eq!(m["body"], "{\"grade\":\"B+\"}");
        assert!(m.get("body_b64").is_none(), "{m}");
        let h = m["headers"].as_object().expect("headers is an object");
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["x-model-version"], "grader-v3");
        assert_eq!(h["vary"], "accept, x-student-id");
        assert_eq!(m["request_id"], "r-1");
        assert_eq!(m["msg_id"], "m-1");
        assert_eq!(m["attempts"], 1);
    }

    #[test]
    fn a_binary_answer_is_base64_and_has_no_text_body() {
        let m = message(&envelope(), &answer(b"\xff\xfe\x00bin"), "t");
        assert!(m.get("body").is_none(), "{m}");
        let b64 = m["body_b64"].as_str().expect("body_b64");
        let decoded =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).expect("b64");
        assert_eq!(decoded, b"\xff\xfe\x00bin");
    }

    #[test]
    fn an_empty_answer_is_an_empty_text() {
        let m = message(&envelope(), &answer(b""), "t");
        assert_eq!(m["body"], "");
    }
}

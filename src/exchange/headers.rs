//! Header hygiene (RFC 9110 §7.6.1): hop-by-hop headers never cross the proxy, the
//! `x-forwarded-*` family tells the upstream who asked, and `x-request-id` ties the
//! client, the AI call, the decision log and the DLQ message together.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_OUTCOME: HeaderName = HeaderName::from_static("x-breakwater-outcome");
pub static X_FALLBACK: HeaderName = HeaderName::from_static("x-breakwater-fallback");
pub static X_REASON: HeaderName = HeaderName::from_static("x-breakwater-reason");
pub static X_DLQ: HeaderName = HeaderName::from_static("x-breakwater-dlq");
pub static X_MODEL_VERSION: HeaderName = HeaderName::from_static("x-breakwater-model-version");
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Read as bytes: one non-ASCII byte elsewhere in the value must not hide a name.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// A client-supplied request id is kept if it is sane (printable, at most 128 bytes), so a
/// Magento trace id survives; otherwise a UUIDv7 is made (time-ordered, easy to sort).
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// Prepares client headers for the upstream. `host` is the original host the client
/// named; the outgoing `Host` is set by the client to the upstream's authority.
pub fn prepare_upstream_headers(
    headers: &mut HeaderMap,
    client_ip: std::net::IpAddr,
    tls: bool,
    host: Option<&str>,
    request_id: &str,
) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    // Several `x-forwarded-for` fields are one list (RFC 9110 §5.3): keep all of it.
    let mut xff = String::new();
    for prev in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    xff.push_str(&client_ip.to_string());
    // Always valid: visible-ASCII values, ", " and an address.
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    // Ours or none: a client's own `x-forwarded-host` never passes as if we had set it.
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => headers.insert(X_FORWARDED_HOST.clone(), v),
        None => headers.remove(&X_FORWARDED_HOST),
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    /// Found by fuzz/headers: one non-ASCII byte (obs-text) in a `Connection` value made
    /// the whole value unreadable as text, so the headers it names reached the upstream.
    #[test]
    fn headers_named_by_a_connection_value_with_obs_text_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"X-Secret-Hop, caf\xe9").unwrap(),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-secret-hop"), "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    /// Found by fuzz/headers: without a host to report, the client's own
    /// `x-forwarded-host` went to the upstream as if breakwater had set it.
    #[test]
    fn a_client_supplied_forwarded_host_never_passes_when_there_is_no_host() {
        for host in [None, Some("bad\u{1}host")] {
            let mut h = HeaderMap::new();
            h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
            prepare_upstream_headers(&mut h, "127.0.0.1".parse().unwrap(), false, host, "r");
            assert!(!h.contains_key(&X_FORWARDED_HOST), "{host:?}: {h:?}");
        }
    }

    /// Found by fuzz/headers: of several `x-forwarded-for` fields only the first was kept,
    /// so the upstream lost the rest of the chain (RFC 9110 §5.3: they are one list).
    #[test]
    fn every_forwarded_for_field_stays_in_the_chain() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        prepare_upstream_headers(&mut h, "127.0.0.1".parse().unwrap(), false, None, "r");
        let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(all, ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]);
    }

    #[test]
    fn forwarded_for_appends_and_request_id_is_kept_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        prepare_upstream_headers(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            true,
            Some("shop.example"),
            "abc",
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "shop.example");
        assert!(!h.contains_key(header::HOST));

        let mut ok = HeaderMap::new();
        ok.insert(&X_REQUEST_ID, HeaderValue::from_static("magento-123"));
        assert_eq!(request_id(&ok), "magento-123");
        let mut bad = HeaderMap::new();
        bad.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_ne!(request_id(&bad), "has space");
    }
}

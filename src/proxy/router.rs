//! Route selection: longest `path_prefix` wins; `host` and `methods` narrow a route.
//!
//! Matching is a plain string prefix (as Envoy's `prefix`), so `/v1/grade` also matches
//! `/v1/grades`; write `/v1/grade/` to require a segment boundary.

use std::sync::Arc;

use crate::config::RouteConfig;

#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Sorted: longest prefix first; at equal length a route with a host beats one without.
    routes: Vec<Arc<RouteConfig>>,
}

impl Router {
    pub fn new(routes: &[Arc<RouteConfig>]) -> Self {
        let mut routes = routes.to_vec();
        routes.sort_by(|a, b| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then_with(|| b.host.is_some().cmp(&a.host.is_some()))
                .then_with(|| b.methods.is_some().cmp(&a.methods.is_some()))
        });
        Router { routes }
    }

    /// `host` is the request's host without port, lower-cased.
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        method: &http::Method,
    ) -> Option<&Arc<RouteConfig>> {
        self.routes.iter().find(|r| {
            path.starts_with(r.path_prefix.as_str())
                && r.host.as_deref().is_none_or(|h| Some(h) == host)
                && r.methods.as_ref().is_none_or(|ms| ms.contains(method))
        })
    }
}

/// Refuses what RFC 9112 §3.2 calls for a 400: an HTTP/1.1 request without `Host`, more
/// than one `Host`, or a `Host` that is not a host. It also refuses a request whose target
/// names an authority (HTTP/1 absolute form, or h2's `:authority`) other than its `Host`:
/// RFC 9112 would let the target's authority win, so a client could reach a route guarded
/// by `host` while naming another host to whatever checked `Host` in front.
pub fn check_host<B>(req: &http::Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header");
    }
    let Some(host) = host else {
        return if req.version() == http::Version::HTTP_11 {
            Err("an HTTP/1.1 request must have a Host header")
        } else {
            Ok(())
        };
    };
    let target = req.uri().authority();
    if host.is_empty() && target.is_none() {
        // RFC 9112 §3.2: the empty value for a target without an authority.
        return Ok(());
    }
    let named = host
        .to_str()
        .ok()
        .filter(|h| !h.contains('@'))
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .ok_or("the Host header is not a valid host[:port]")?;
    match target {
        Some(t) if !t.host().eq_ignore_ascii_case(named.host()) => {
            Err("the request target names another host than the Host header")
        }
        _ => Ok(()),
    }
}

/// The host a request names: `:authority` (HTTP/2) or `Host`, without port, lower-cased.
pub fn request_host<B>(req: &http::Request<B>) -> Option<String> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    // Keep IPv6 literals like "[::1]" whole.
                    Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                        host.to_string()
                    }
                    _ => h.to_string(),
                })
        })?;
    Some(raw.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(toml_routes: &str) -> Router {
        let text = format!(
            "[server]\nlisten=\"127.0.0.1:0\"\nadmin_listen=\"127.0.0.1:0\"\n[upstreams.a]\nurl=\"http://127.0.0.1:1\"\n{toml_routes}"
        );
        let cfg = Config::from_toml(&text).unwrap();
        Router::new(&cfg.routes)
    }

    #[test]
    fn longest_prefix_wins_and_host_and_methods_narrow() {
        let r = router(
            r#"
[[routes]]
name = "root"
path_prefix = "/"
upstream = "a"
[[routes]]
name = "v1"
path_prefix = "/v1/"
upstream = "a"
[[routes]]
name = "grading-post"
path_prefix = "/v1/grading"
methods = ["POST"]
upstream = "a"
[[routes]]
name = "tenant"
path_prefix = "/v1/"
host = "uni.example"
upstream = "a"
"#,
        );
        let name = |host: Option<&str>, path: &str, m: http::Method| {
            r.route(host, path, &m).map(|r| r.name.clone())
        };
        assert_eq!(
            name(None, "/v1/grading/x", http::Method::POST).as_deref(),
            Some("grading-post")
        );
        assert_eq!(
            name(None, "/v1/grading/x", http::Method::GET).as_deref(),
            Some("v1")
        );
        assert_eq!(
            name(Some("uni.example"), "/v1/x", http::Method::GET).as_deref(),
            Some("tenant")
        );
        assert_eq!(
            name(Some("other"), "/v1/x", http::Method::GET).as_deref(),
            Some("v1")
        );
        assert_eq!(
            name(None, "/health", http::Method::GET).as_deref(),
            Some("root")
        );
    }

    fn host_check(uri: &str, version: http::Version, hosts: &[&str]) -> Result<(), &'static str> {
        let mut req = http::Request::builder().uri(uri).version(version);
        for h in hosts {
            req = req.header("host", *h);
        }
        check_host(&req.body(()).unwrap())
    }

    #[test]
    fn host_check_follows_rfc_9112_section_3_2() {
        use http::Version;
        assert!(host_check("/x", Version::HTTP_11, &["shop.example"]).is_ok());
        assert!(host_check("/x", Version::HTTP_11, &["Shop.Example:8080"]).is_ok());
        assert!(host_check("/x", Version::HTTP_11, &["[::1]:80"]).is_ok());
        assert!(host_check("/x", Version::HTTP_11, &[]).is_err());
        assert!(host_check("/x", Version::HTTP_10, &[]).is_ok());
        assert!(host_check("/x", Version::HTTP_2, &[]).is_ok());
        assert!(host_check("/x", Version::HTTP_11, &["a", "a"]).is_err());
        assert!(host_check("/x", Version::HTTP_11, &["a b"]).is_err());
        assert!(host_check("/x", Version::HTTP_11, &["user@a"]).is_err());
        assert!(host_check("/x", Version::HTTP_11, &[""]).is_ok());
        // Absolute form: the target's host must be the Host header's (the port may differ).
        assert!(host_check("http://a.example/x", Version::HTTP_11, &["A.example:80"]).is_ok());
        assert!(host_check("http://evil.example/x", Version::HTTP_11, &["a.example"]).is_err());
        assert!(host_check("http://a.example/x", Version::HTTP_11, &[""]).is_err());
        assert!(host_check("http://a.example/x", Version::HTTP_2, &[]).is_ok());
        assert!(host_check("http://a.example/x", Version::HTTP_2, &["b.example"]).is_err());
    }

    #[test]
    fn request_host_strips_port_and_keeps_ipv6() {
        let req = http::Request::builder()
            .uri("/x")
            .header("host", "Shop.Example:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("shop.example"));
        let req = http::Request::builder()
            .uri("/x")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("[::1]"));
    }
}

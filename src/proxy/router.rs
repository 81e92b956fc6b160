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

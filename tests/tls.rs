//! TLS end to end with a CA made in the test (rcgen): a TLS client through breakwater's TLS
//! listener to a TLS mock AI that requires a client certificate (mTLS), and the upstream
//! certificates breakwater must refuse (untrusted, expired, for another host), each with a
//! clear error for the client and a count in `breakwater_upstream_tls_errors_total`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA that signs server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, expired: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        Leaf {
            cert: params.signed_by(&key, &self.issuer).unwrap().pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        roots
    }
}

/// A mock AI over TLS that only talks to clients with a certificate from `clients`.
async fn mtls_mock(server: &Leaf, clients: &Ca) -> MockAi {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(clients.roots()),
        provider(),
    )
    .build()
    .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(server.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    MockAi::bind(([127, 0, 0, 1], 0).into(), Some(Arc::new(cfg)))
        .await
        .unwrap()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// One route per (name, upstream TOML) on `/name`, no retries, no fallback.
fn routes_config(server_extra: &str, upstreams: &[(&str, String)]) -> String {
    let mut cfg = format!("{}{server_extra}\n", server_section());
    for (name, up) in upstreams {
        cfg.push_str(&format!("[upstreams.{name}]\n{up}\n"));
    }
    for (name, _) in upstreams {
        cfg.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{name}\"\ntimeout_ms = 5000\n"
        ));
    }
    cfg
}

/// A TLS client (h2 or HTTP/1.1 by ALPN) trusting `ca` reaches breakwater's TLS listener,
/// which forwards to an AI that requires a client certificate: breakwater presents its own
/// (`client_cert_file` / `client_key_file`) and the AI answers. The same AI, behind an
/// upstream entry without the client certificate, refuses the handshake; the client gets a
/// 502 that says so, the failure is counted, and the AI served nothing for it.
#[tokio::test]
async fn a_tls_client_reaches_an_mtls_upstream_through_the_tls_listener() {
    let ca = Ca::new("breakwater test CA");
    let ai = mtls_mock(&ca.server(&["localhost"]), &ca).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let inbound = ca.server(&["localhost"]);
    let client = ca.leaf(&["breakwater"], ExtendedKeyUsagePurpose::ClientAuth, false);
    let url = format!("https://localhost:{}", ai.addr().port());
    let ca_file = write(d, "ca.pem", &ca.pem);
    let server_tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        write(d, "tls.crt", &inbound.cert),
        write(d, "tls.key", &inbound.key)
    );
    let cfg = routes_config(
        &server_tls,
        &[
            (
                "mtls_ok",
                format!(
                    "url = \"{url}\"\nca_file = \"{ca_file}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                    write(d, "client.crt", &client.cert),
                    write(d, "client.key", &client.key)
                ),
            ),
            ("mtls_nocert", format!("url = \"{url}\"\nca_file = \"{ca_file}\"\n")),
        ],
    );
    let proxy = TestProxy::start(&cfg).await;

    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Full<Bytes>>(https);
    let get = |path: &str| {
        let uri = format!("https://localhost:{}{path}", proxy.addr.port());
        let client = client.clone();
        async move {
            let resp = client
                .request(
                    http::Request::get(uri)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts, body)
        }
    };

    let (head, body) = get("/mtls_ok/v1/score").await;
    assert_eq!(head.status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(head.version, http::Version::HTTP_2, "ALPN picked h2");
    assert_eq!(ai.requests(), 1);
    let seen = ai.received();
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");

    let before = metric(
        &proxy.metrics().await,
        "breakwater_upstream_tls_errors_total{upstream=\"mtls_nocert\",kind=\"client_cert_rejected\"} ",
    );
    let (head, body) = get("/mtls_nocert/v1/score").await;
    assert_eq!(head.status, 502, "{}", String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "connect_error", "{json}");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("refused our client certificate") && message.contains("mtls_nocert"),
        "{message}"
    );
    assert_eq!(
        ai.requests(),
        1,
        "the AI served nothing without a client certificate"
    );
    let after = metric(
        &proxy.metrics().await,
        "breakwater_upstream_tls_errors_total{upstream=\"mtls_nocert\",kind=\"client_cert_rejected\"} ",
    );
    assert_eq!(after, before + 1);

    // And the certified path still works after the refusal (no poisoned pool).
    let (head, _) = get("/mtls_ok/v1/score").await;
    assert_eq!(head.status, 200);
    assert_eq!(ai.requests(), 2);
    proxy.stop().await;
}

/// Upstream certificates signed by an unknown CA, expired, or issued for another host are
/// refused: 502 `connect_error` with a message that names the problem, the AI receives
/// nothing, and each is counted under its own `kind`.
#[tokio::test]
async fn untrusted_expired_and_wrong_host_upstream_certificates_are_refused_and_counted() {
    let ca = Ca::new("breakwater test CA");
    let stranger = Ca::new("someone else's CA");
    let untrusted = stranger.server(&["localhost"]);
    let expired = ca.leaf(&["localhost"], ExtendedKeyUsagePurpose::ServerAuth, true);
    let other_host = ca.server(&["ai.other.example"]);
    let good = ca.server(&["localhost"]);
    let mocks = [
        (
            "tls_untrusted",
            "untrusted",
            "not signed by a trusted CA",
            untrusted,
        ),
        ("tls_expired", "expired", "has expired", expired),
        (
            "tls_wrong_host",
            "wrong_host",
            "not valid for the host",
            other_host,
        ),
        ("tls_good", "", "", good),
    ];
    let mut ais = Vec::new();
    for (_, _, _, leaf) in &mocks {
        ais.push(MockAi::start_tls(leaf.cert.clone(), leaf.key.clone()).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let upstreams: Vec<(&str, String)> = mocks
        .iter()
        .zip(&ais)
        .map(|((name, ..), ai)| {
            (
                *name,
                format!(
                    "url = \"https://localhost:{}\"\nca_file = \"{ca_file}\"\n",
                    ai.addr().port()
                ),
            )
        })
        .collect();
    let proxy = TestProxy::start(&routes_config("", &upstreams)).await;
    let counter = |name: &str, kind: &str| {
        format!("breakwater_upstream_tls_errors_total{{upstream=\"{name}\",kind=\"{kind}\"}} ")
    };
    let before = proxy.metrics().await;

    for ((name, kind, words, _), ai) in mocks.iter().zip(&ais) {
        let r = proxy.get(&format!("/{name}/v1/price")).await;
        if kind.is_empty() {
            assert_eq!(
                r.status,
                200,
                "the control: {:?}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(ai.requests(), 1);
            continue;
        }
        assert_eq!(
            r.status,
            502,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("x-breakwater-reason"), Some("connect_error"));
        let json = r.json();
        assert_eq!(json["error"]["code"], "connect_error");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{name}: {message}");
        assert_eq!(ai.requests(), 0, "{name}: the AI got a request");
    }
    let after = proxy.metrics().await;
    for (name, kind, ..) in &mocks[..3] {
        let c = counter(name, kind);
        assert_eq!(metric(&after, &c), metric(&before, &c) + 1, "{c}\n{after}");
    }
    assert!(!after.contains("upstream=\"tls_good\",kind="), "{after}");
    proxy.stop().await;
}

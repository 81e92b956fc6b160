//! Test helpers that read like a story: `MockAi::start()`, `TestProxy::start(config)`.
//! Everything talks over real sockets on 127.0.0.1.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::zombie_processes
)]

pub mod rabbit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use breakwater::app::{self, Listeners};
use breakwater::config::Config;

#[allow(unused_imports)]
pub use loadtests::mock::MockAi;

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn outcome(&self) -> &str {
        self.header("x-breakwater-outcome").unwrap_or("")
    }
}

/// Polls `f` every 50 ms until it is true or `within` has passed; says which.
pub async fn poll_until<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The header lines every test config starts with; listeners come from port 0.
pub fn server_section() -> &'static str {
    "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nwatch_config = true\n"
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), app::AppError>>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl TestProxy {
    /// Writes `config` to a temp file and starts breakwater on it, on port 0.
    pub async fn start(config: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("breakwater.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::start_at(dir, config_path).await
    }

    pub async fn start_at(dir: tempfile::TempDir, config_path: PathBuf) -> TestProxy {
        let cfg = Config::load(&config_path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let data = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = data.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app::run(
            config_path.clone(),
            cfg,
            Listeners { data, admin },
            shutdown.clone(),
        ));
        let proxy = TestProxy {
            addr,
            admin: admin_addr,
            dir,
            config_path,
            shutdown,
            task: Some(task),
            client: http_client(),
        };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(r) = self.admin_get("/readyz").await {
                if r.status == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("proxy never became ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> Reply {
        let resp = self
            .client
            .request(req)
            .await
            .expect("request to the proxy failed");
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .expect("reading the proxy body")
            .to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(
            http::Request::get(self.url(path))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.send(
            http::Request::post(self.url(path))
                .header("content-type", "application/json")
                .body(Full::new(body.into()))
                .unwrap(),
        )
        .await
    }

    pub async fn admin_get(&self, path: &str) -> Result<Reply, hyper_util::client::legacy::Error> {
        let resp = self
            .client
            .request(
                http::Request::get(format!("http://{}{}", self.admin, path))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await?;
        let (parts, body) = resp.into_parts();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        })
    }

    pub async fn admin_post(&self, path: &str, body: &str, token: Option<&str>) -> Reply {
        let mut req = http::Request::post(format!("http://{}{}", self.admin, path))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = self
            .client
            .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// Replaces the config file the way Kubernetes does: write elsewhere, then rename.
    pub fn replace_config(&self, text: &str) {
        let tmp = self.dir.path().join(".breakwater.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    pub async fn admin_config(&self) -> serde_json::Value {
        self.admin_get("/admin/config").await.unwrap().json()
    }

    pub async fn metrics(&self) -> String {
        String::from_utf8(self.admin_get("/metrics").await.unwrap().body.to_vec()).unwrap()
    }

    /// Starts the shutdown (as SIGTERM does) and returns at once, so a test can probe the
    /// admin API while in-flight requests drain.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A config with one route "ai" on `/` to `upstream_url`, plus extra TOML appended.
pub fn simple_config(upstream_url: &str, route_extra: &str, extra: &str) -> String {
    format!(
        "{}\n[upstreams.ai]\nurl = \"{upstream_url}\"\n\n[[routes]]\nname = \"ai\"\npath_prefix = \"/\"\nupstream = \"ai\"\ntimeout_ms = 2000\nmodel_version_header = \"x-model-version\"\n{route_extra}\n{extra}",
        server_section()
    )
}

pub fn breakwater_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_breakwater"))
}

/// `breakwater audit keygen DIR`: the key pair's paths (signing.key, signing.pub).
pub fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let out = std::process::Command::new(breakwater_bin())
        .args(["audit", "keygen"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.join("signing.key"), dir.join("signing.pub"))
}

/// breakwater as a real process on fixed free ports, for tests that kill -9 it.
pub struct ProcessProxy {
    pub port: u16,
    pub admin: u16,
    pub config_path: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ProcessProxy {
    /// Writes `config` (made by `simple_config` & co, listening on port 0) with two free
    /// ports into `dir`.
    pub fn new(dir: &Path, config: &str) -> ProcessProxy {
        let (port, admin) = (free_port(), free_port());
        let text = config
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"127.0.0.1:{admin}\""),
            )
            .replace(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"127.0.0.1:{port}\""),
            );
        let config_path = dir.join("process-proxy.toml");
        std::fs::write(&config_path, text).unwrap();
        ProcessProxy {
            port,
            admin,
            config_path,
        }
    }

    /// Starts the binary and waits until the data port accepts connections.
    pub async fn spawn(&self) -> std::process::Child {
        let mut cmd = std::process::Command::new(breakwater_bin());
        cmd.arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "error");
        self.start(cmd).await
    }

    /// Starts the binary pinned to one CPU (taskset), its log (info) into `log`.
    pub async fn spawn_on_one_cpu(&self, log: &Path) -> std::process::Child {
        let mut cmd = std::process::Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(breakwater_bin())
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(log).unwrap());
        self.start(cmd).await
    }

    /// Starts `cmd` (which runs the binary on `config_path`, e.g. under `sh -c 'umask ..'`)
    /// and waits until the data port accepts connections.
    pub async fn spawn_command(&self, cmd: std::process::Command) -> std::process::Child {
        self.start(cmd).await
    }

    async fn start(&self, mut cmd: std::process::Command) -> std::process::Child {
        let child = cmd.spawn().unwrap();
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return child;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("breakwater did not start");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// SIGTERM, then wait: the graceful path (drain, flush the decision log).
pub fn terminate(mut child: std::process::Child) {
    std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    child.wait().unwrap();
}

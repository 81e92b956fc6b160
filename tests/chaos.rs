//! Chaos under load, the CI-fast part (issue 14): the AI resetting connections
//! mid-response, a full disk under the spool and under the decision log (a small tmpfs),
//! the config file deleted or made unreadable during reload, and short kill -9 and soak
//! runs of the `loadtests chaos` drivers. Real sockets, the real mock, real RabbitMQ.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::rabbit;
use support::*;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn audit_section(dir: &Path, log_dir: &Path) -> String {
    let key = dir.join("audit.key");
    std::fs::write(&key, KEY).unwrap();
    format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\n",
        log_dir.join("decisions.jsonl").display(),
        key.display()
    )
}

/// Every decision record (not events) in the log files under `dir`.
fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .filter(|v| v.get("event").is_none())
        .collect()
}

// ---- the AI resets the connection mid-response ----

/// What a client got: an answer read whole, or an error (the connection was cut).
enum Got {
    Whole(Reply),
    Cut(String),
}

async fn get_within(proxy: &TestProxy, path: &str) -> Got {
    let client = http_client();
    let req = http::Request::get(proxy.url(path))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => return Got::Cut(format!("request: {e}")),
        };
        let (parts, body) = resp.into_parts();
        match body.collect().await {
            Ok(b) => Got::Whole(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: b.to_bytes(),
            }),
            Err(e) => Got::Cut(format!("body after {}: {e}", parts.status)),
        }
    })
    .await;
    got.unwrap_or_else(|_| panic!("{path}: no answer within 15 s (a hang)"))
}

fn breaker_state(breakers: &serde_json::Value, route: &str) -> String {
    breakers["routes"][route]["breaker"]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn reset_config(ai: &MockAi, dir: &Path) -> String {
    let breaker =
        "[routes.breaker]\nconsecutive_failures = 3\nopen_ms = 600000\nopen_max_ms = 600000\n";
    format!(
        "{}\n[upstreams.ai]\nurl = \"{}\"\n\n\
         [[routes]]\nname = \"buffered\"\npath_prefix = \"/buffered\"\nupstream = \"ai\"\ntimeout_ms = 3000\n{breaker}\
         [[routes.fallback]]\nkind = \"cache\"\nttl_s = 60\n\
         [[routes.fallback]]\nkind = \"static\"\nstatus = 200\nbody = '{{\"items\":[]}}'\n\n\
         [[routes]]\nname = \"bare\"\npath_prefix = \"/bare\"\nupstream = \"ai\"\ntimeout_ms = 3000\n{breaker}\
         [[routes.fallback]]\nkind = \"cache\"\nttl_s = 60\n\n\
         [[routes]]\nname = \"streamed\"\npath_prefix = \"/streamed\"\nupstream = \"ai\"\ntimeout_ms = 3000\n{breaker}\n\
         {}",
        server_section(),
        ai.url(),
        audit_section(dir, &dir.join("audit")),
    )
}

#[tokio::test]
async fn an_ai_resetting_mid_response_gets_a_fallback_or_a_clear_error_and_trips_the_breaker() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&reset_config(&ai, dir.path())).await;
    ai.reset_mid_body(true);

    // A buffered route (its cache needs the whole body) with a static fallback: the cut
    // answer is a failure, the client gets the fallback.
    for i in 0..3 {
        match get_within(&proxy, "/buffered/x").await {
            Got::Whole(r) => {
                assert_eq!(r.status, 200, "request {i}");
                assert_eq!(r.outcome(), "fallback", "request {i}: {:?}", r.headers);
                assert_eq!(r.header("x-breakwater-fallback"), Some("static"));
                assert_eq!(&r.body[..], b"{\"items\":[]}");
            }
            Got::Cut(e) => panic!("buffered request {i} was cut: {e}"),
        }
    }
    // Without a fallback left (the cache is empty): a clear 502 with a JSON error.
    for i in 0..3 {
        match get_within(&proxy, "/bare/x").await {
            Got::Whole(r) => {
                assert_eq!(r.status, 502, "request {i}: {:?}", r.body);
                assert_eq!(r.outcome(), "error");
                assert!(r.json()["error"]["code"].is_string(), "{:?}", r.body);
            }
            Got::Cut(e) => panic!("bare request {i} was cut: {e}"),
        }
    }
    // A streamed route: the head was already on its way, so the client sees the body cut
    // short (never a hang, never a complete-looking 200).
    for i in 0..3 {
        match get_within(&proxy, "/streamed/x").await {
            Got::Whole(r) => assert!(
                r.status >= 500 || r.outcome() == "fallback",
                "streamed request {i}: a cut answer looked whole: {} {:?}",
                r.status,
                r.body
            ),
            Got::Cut(e) => eprintln!("streamed {i}: cut: {e}"),
        }
    }

    // Each route's breaker counted the three cuts and opened.
    let breakers = proxy.admin_get("/admin/breakers").await.unwrap().json();
    for route in ["buffered", "bare", "streamed"] {
        assert_eq!(
            breaker_state(&breakers, route),
            "open",
            "{route}: {breakers}"
        );
    }
    let r = proxy.get("/buffered/x").await;
    assert_eq!(r.header("x-breakwater-reason"), Some("breaker_open"));
    let seen = ai.requests();
    let _ = proxy.get("/streamed/x").await;
    assert_eq!(
        ai.requests(),
        seen,
        "an open breaker sent a request to the AI"
    );

    // One decision record per request, none claiming the AI answered.
    proxy.stop().await;
    let recs = records(&dir.path().join("audit"));
    for (route, sent) in [("buffered", 4), ("bare", 3), ("streamed", 4)] {
        let mine: Vec<_> = recs.iter().filter(|r| r["route"] == route).collect();
        assert_eq!(mine.len(), sent, "{route}: one record per request");
        for r in &mine {
            assert_ne!(
                r["outcome"], "ai",
                "{route}: a cut answer recorded as ai: {r}"
            );
        }
    }
    let report = breakwater::cli::verify_paths(&[dir.path().join("audit")]).unwrap();
    assert!(report.records >= 11, "{report:?}");
}

// ---- disk full: a small tmpfs under the spool and under the decision log ----

/// A 2 MiB tmpfs mounted on a fresh directory, unmounted on drop. `None` (the test
/// skips) where mounting is not allowed, except in CI.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("cannot mount a tmpfs (run as root) and CI=true");
            }
            eprintln!("skipping: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Fills the filesystem but `leave` bytes with a filler file.
    fn fill(&self, leave: u64) {
        let filler = self.path().join("filler");
        let _ = std::fs::remove_file(&filler);
        let free = fs_free(self.path());
        let n = free.saturating_sub(leave);
        let mut f = std::fs::File::create(&filler).unwrap();
        use std::io::Write;
        let chunk = vec![0u8; 4096];
        let mut written = 0;
        while written < n {
            let k = chunk.len().min((n - written) as usize);
            if f.write_all(&chunk[..k]).is_err() {
                break;
            }
            written += k as u64;
        }
        let _ = f.sync_all();
    }

    fn unfill(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

fn fs_free(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn readyz(proxy: &TestProxy) -> Reply {
    proxy.admin_get("/readyz").await.unwrap()
}

#[tokio::test]
async fn a_full_spool_disk_answers_rejected_readiness_says_degraded_and_space_returning_heals() {
    let Some(fs) = Tmpfs::mount() else { return };
    let ai = MockAi::start().await;
    ai.outage(true).await;
    let route_extra = "replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n[[routes.fallback]]\nkind = \"static\"\nstatus = 202\nbody = '{\"status\":\"queued\"}'\n";
    // The spool's own bound (64 MiB) is far above the disk: the disk fills first.
    let dlq = format!(
        "[dlq]\nspool_dir = \"{}\"\nspool_max_bytes = 67108864\n",
        fs.path().join("spool").display()
    );
    let proxy = TestProxy::start(&simple_config(&ai.url(), route_extra, &dlq)).await;
    fs.fill(300 * 1024);
    let body = format!("{{\"essay\":\"{}\"}}", "x".repeat(60_000));
    let mut outcomes = Vec::new();
    for i in 0..12 {
        let r = proxy.post("/v1/grading", body.clone()).await;
        assert_eq!(
            r.status, 202,
            "request {i}: the client still gets its answer"
        );
        outcomes.push(r.header("x-breakwater-dlq").unwrap_or("").to_string());
    }
    assert!(outcomes.iter().any(|o| o == "spooled"), "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .skip_while(|o| *o == "spooled")
            .all(|o| o == "rejected")
            && outcomes.last().map(String::as_str) == Some("rejected"),
        "once the disk is full every message is rejected: {outcomes:?}"
    );
    // Readiness stays on (the fallback still answers) and says why it is degraded.
    let r = readyz(&proxy).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let degraded = r.json()["degraded"].to_string();
    assert!(
        degraded.contains("spool"),
        "readyz does not report the full spool: {}",
        String::from_utf8_lossy(&r.body)
    );

    // Space returns: the next message is spooled and the indication clears.
    fs.unfill();
    let r = proxy.post("/v1/grading", body.clone()).await;
    assert_eq!(r.header("x-breakwater-dlq"), Some("spooled"));
    let r = readyz(&proxy).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()
            .get("degraded")
            .is_none_or(|d| d.as_array().is_some_and(Vec::is_empty)),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // What was spooled is all there, nothing damaged by the failed writes.
    let report = breakwater::cli::spool_inspect(&fs.path().join("spool")).unwrap();
    let spooled = outcomes.iter().filter(|o| *o == "spooled").count() + 1;
    assert_eq!(report.pending as usize, spooled, "{}", report.table());
    assert_eq!(report.corrupt, 0, "{}", report.table());
    proxy.stop().await;
}

#[tokio::test]
async fn a_full_audit_disk_keeps_answering_turns_strict_readiness_off_then_the_log_resumes_and_verifies(
) {
    let Some(fs) = Tmpfs::mount() else { return };
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log_dir = fs.path().join("audit");
    // `strict` readiness, so the probe turns 503 (the default, `traffic`, stays 200 and
    // reports `audit_disk` as degraded: tests/readiness.rs).
    let cfg = simple_config(&ai.url(), "", &audit_section(dir.path(), &log_dir)).replacen(
        "watch_config = true\n",
        "watch_config = true\nreadiness = \"strict\"\n",
        1,
    );
    let proxy = TestProxy::start(&cfg).await;
    for _ in 0..5 {
        assert_eq!(proxy.get("/v1/x").await.status, 200);
    }
    fs.fill(0);
    // The log cannot write: clients still get their answers.
    for i in 0..50 {
        let r = proxy.get("/v1/x").await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.outcome(), "ai");
    }
    // Strict readiness reports it (off while records cannot be written: see the README).
    assert!(
        poll_until(Duration::from_secs(10), || async {
            readyz(&proxy).await.status == 503
        })
        .await,
        "readyz never reported the full decision log"
    );
    let r = readyz(&proxy).await;
    assert!(
        String::from_utf8_lossy(&r.body).contains("decision log"),
        "{:?}",
        r.body
    );
    assert!(proxy
        .metrics()
        .await
        .contains("breakwater_audit_write_errors_total"));

    // Space returns: the writer resumes, readiness comes back, every record is written.
    fs.unfill();
    assert!(
        poll_until(Duration::from_secs(30), || async {
            readyz(&proxy).await.status == 200
        })
        .await,
        "readiness did not come back after space returned"
    );
    for _ in 0..5 {
        assert_eq!(proxy.get("/v1/x").await.status, 200);
    }
    proxy.stop().await;
    let report = breakwater::cli::verify_paths(std::slice::from_ref(&log_dir)).unwrap();
    assert!(report.records >= 60, "{report:?}");
    assert_eq!(records(&log_dir).len(), 60, "a record was lost or doubled");
}

// ---- the config file deleted or unreadable during reload ----

/// The proxy process, killed if the test fails before it ends it.
struct Reaped(Option<std::process::Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn http_status(url: &str, method: http::Method) -> (u16, String) {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn reload_errors(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("breakwater_config_reloads_total{result=\"error\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_deleted_or_unreadable_config_keeps_the_old_one_serving_and_says_why() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bw = ProcessProxy::new(dir.path(), &simple_config(&ai.url(), "", ""));
    let log = dir.path().join("breakwater.log");
    let mut cmd = std::process::Command::new(breakwater_bin());
    cmd.arg("--config")
        .arg(&bw.config_path)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let child = Reaped(Some(cmd.spawn().unwrap()));
    let admin = format!("http://127.0.0.1:{}", bw.admin);
    assert!(
        poll_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", bw.port))
                .await
                .is_ok()
        })
        .await
    );
    let original = std::fs::read_to_string(&bw.config_path).unwrap();
    let metrics = || async {
        reload_errors(
            &http_status(&format!("{admin}/metrics"), http::Method::GET)
                .await
                .1,
        )
    };
    let serves = || async {
        let (s, _) = http_status(&bw.url("/v1/x"), http::Method::GET).await;
        s == 200
    };
    let rejected_in_log = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("config reload rejected")
            .count()
    };

    for (case, break_it) in [
        (
            "deleted",
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()) as Box<dyn Fn(&Path)>,
        ),
        (
            "a directory",
            Box::new(|p: &Path| {
                std::fs::remove_file(p).unwrap();
                std::fs::create_dir(p).unwrap();
            }),
        ),
    ] {
        let before = metrics().await;
        let logged = rejected_in_log();
        break_it(&bw.config_path);
        // The file watcher sees it, logs why, counts it.
        assert!(
            poll_until(Duration::from_secs(20), || async {
                rejected_in_log() > logged
            })
            .await,
            "{case}: the watcher logged no rejected reload"
        );
        let log_text = std::fs::read_to_string(&log).unwrap();
        assert!(
            log_text.contains("trigger=\"file_change\""),
            "{case}: {log_text}"
        );
        let (status, body) =
            http_status(&format!("{admin}/admin/reload"), http::Method::POST).await;
        assert_eq!(status, 400, "{case}: {body}");
        assert!(
            body.contains(&bw.config_path.display().to_string()),
            "{case}: the error does not name the file: {body}"
        );
        assert!(
            metrics().await >= before + 2,
            "{case}: reload errors not counted"
        );
        assert!(serves().await, "{case}: the old config stopped serving");
        // The file comes back (the way Kubernetes writes it): reload works.
        if bw.config_path.is_dir() {
            std::fs::remove_dir(&bw.config_path).unwrap();
        }
        let tmp = dir.path().join(".tmp.toml");
        std::fs::write(&tmp, format!("# {case}\n{original}")).unwrap();
        std::fs::rename(&tmp, &bw.config_path).unwrap();
        let (status, body) =
            http_status(&format!("{admin}/admin/reload"), http::Method::POST).await;
        assert_eq!(status, 200, "{case}: {body}");
        assert!(serves().await);
    }
    drop(child);
}

// ---- the chaos drivers, short ----

#[tokio::test]
async fn kill_9_five_times_mid_burst_loses_no_acknowledged_message() {
    if !rabbit::available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = loadtests::chaos::kill9(&loadtests::chaos::Kill9Args {
        proxy_bin: breakwater_bin().to_path_buf(),
        loops: 5,
        clients: 4,
        kill_after_ms: (150, 500),
        amqp_url: rabbit::URL.into(),
        work_dir: dir.path().to_path_buf(),
        drain_within: Duration::from_secs(120),
    })
    .await
    .unwrap();
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.loops_run, 5);
    assert!(report.acknowledged > 0 && report.messages_checked >= report.acknowledged as u64);
}

#[tokio::test]
async fn a_short_soak_keeps_rss_and_fds_flat() {
    if !rabbit::available().await {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let report = loadtests::chaos::soak(&loadtests::chaos::SoakArgs {
        proxy_bin: breakwater_bin().to_path_buf(),
        duration: Duration::from_secs(20),
        rate: 200.0,
        amqp_url: rabbit::URL.into(),
        work_dir: dir.path().to_path_buf(),
        sample_every: Duration::from_secs(2),
        warmup: Duration::from_secs(6),
    })
    .await
    .unwrap();
    assert!(report.ok, "{report:#?}");
    assert!(report.requests > 3000, "{report:#?}");
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_config_made_unreadable_keeps_the_old_one_for_an_unprivileged_process() {
    // chmod 000 means nothing to root: breakwater runs as nobody (setpriv), as in a pod.
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !running_as_root() || !setpriv {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("this test needs root and setpriv (util-linux) in CI");
        }
        eprintln!("skipping: needs root and setpriv");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bw = ProcessProxy::new(dir.path(), &simple_config(&ai.url(), "", ""));
    std::fs::set_permissions(&bw.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = dir.path().join("breakwater.log");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(breakwater_bin())
        .arg("--config")
        .arg(&bw.config_path)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
    let child = Reaped(Some(cmd.spawn().unwrap()));
    assert!(
        poll_until(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", bw.port))
                .await
                .is_ok()
        })
        .await,
        "breakwater did not start as nobody: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let admin = format!("http://127.0.0.1:{}", bw.admin);
    let before = reload_errors(
        &http_status(&format!("{admin}/metrics"), http::Method::GET)
            .await
            .1,
    );

    std::fs::set_permissions(&bw.config_path, std::fs::Permissions::from_mode(0o000)).unwrap();
    let (status, body) = http_status(&format!("{admin}/admin/reload"), http::Method::POST).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("ermission denied") && body.contains(&bw.config_path.display().to_string()),
        "not a clear error: {body}"
    );
    let after = reload_errors(
        &http_status(&format!("{admin}/metrics"), http::Method::GET)
            .await
            .1,
    );
    assert!(after > before, "the refused reload was not counted");
    let (s, _) = http_status(&bw.url("/v1/x"), http::Method::GET).await;
    assert_eq!(s, 200, "the old config stopped serving");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("config reload rejected"));

    std::fs::set_permissions(&bw.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, body) = http_status(&format!("{admin}/admin/reload"), http::Method::POST).await;
    assert_eq!(status, 200, "{body}");
    drop(child);
}

//! Decision log, end to end: real requests through breakwater, records on disk, the
//! `breakwater audit verify` CLI against edited, truncated and rotated logs, and a
//! kill -9 in the middle of a burst.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

const KEY_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const KEY_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

fn audit_section(dir: &Path, key: &str, extra: &str) -> String {
    let key_file = dir.join(format!("key-{}", &key[..4]));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nredact_headers = [\"authorization\", \"cookie\"]\n{extra}\n",
        dir.join("decisions.jsonl").display(),
        key_file.display()
    )
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort_by_key(|p| {
        (
            !p.file_stem().unwrap().to_str().unwrap().contains('-'),
            p.clone(),
        )
    });
    files
        .iter()
        .flat_map(|f| {
            // The live file is briefly absent while the writer rotates it.
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn decisions(dir: &Path) -> Vec<serde_json::Value> {
    records(dir)
        .into_iter()
        .filter(|r| r.get("request_id").is_some())
        .collect()
}

/// Waits until the log holds `n` decision records (the writer fsyncs in groups).
async fn wait_for(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    // Generous: on a loaded 2-core VM a group fsync can take seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        let d = decisions(dir);
        if d.len() >= n {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "only {} of {n} decision records appeared",
        decisions(dir).len()
    );
}

fn verify(paths: &[&Path]) -> (bool, String) {
    let out = Command::new(breakwater_bin())
        .args(["audit", "verify"])
        .args(paths)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn every_request_gets_exactly_one_record_with_its_outcome() {
    let ai = MockAi::start().await;
    ai.set_model_version("rec-v8");
    let dir = tempfile::tempdir().unwrap();
    let route = "[[routes.fallback]]\nkind = \"static\"\nbody = '{}'\n";
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        route,
        &audit_section(dir.path(), KEY_A, ""),
    ))
    .await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            proxy
                .post("/v1/grading", r#"{"essay":1}"#)
                .await
                .header("x-request-id")
                .unwrap()
                .to_string(),
        );
    }
    ai.set_error_rate(1.0, 503);
    for _ in 0..3 {
        let r = proxy.get("/v1/grading").await;
        assert_eq!(r.outcome(), "fallback");
        ids.push(r.header("x-request-id").unwrap().to_string());
    }
    let recs = wait_for(dir.path(), 8).await;
    assert_eq!(recs.len(), 8, "one record per request");
    for (rec, id) in recs.iter().zip(&ids) {
        assert_eq!(rec["request_id"], id.as_str());
        assert_eq!(rec["route"], "ai");
        assert_eq!(rec["upstream"], "ai");
        assert_eq!(rec["model_version"], "rec-v8");
        assert_eq!(rec["key_id"].as_str().unwrap().len(), 16);
        assert_eq!(rec["schema_v"], 1);
        assert!(rec["event_id"].as_str().unwrap().len() == 36);
        assert!(rec["latency_us"].as_u64().is_some());
        assert!(rec["ts_end"].as_str().unwrap() >= rec["ts_start"].as_str().unwrap());
        assert_eq!(rec["output_digest"].as_str().unwrap().len(), 64);
    }
    assert_eq!(recs[0]["outcome"], "ai");
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[0]["method"], "POST");
    assert_eq!(recs[0]["attempts"], 1);
    assert_eq!(recs[7]["outcome"], "fallback");
    assert_eq!(recs[7]["fallback"], "static");
    assert_eq!(recs[7]["reason"], "upstream_5xx");
    // The chain holds, and find returns the request's record.
    assert!(verify(&[dir.path()]).0);
    let out = Command::new(breakwater_bin())
        .args(["audit", "find", "--request-id", &ids[2]])
        .arg(dir.path())
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&out.stdout);
    assert_eq!(found.lines().count(), 1);
    assert!(found.contains(&ids[2]));
    proxy.stop().await;
}

#[tokio::test]
async fn digests_are_keyed_and_redacted_headers_never_reach_the_file() {
    let ai = MockAi::start().await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pa = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(da.path(), KEY_A, ""),
    ))
    .await;
    let pb = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(db.path(), KEY_B, ""),
    ))
    .await;
    let body = r#"{"student":"s-1042","answer":"photosynthesis"}"#;
    for p in [&pa, &pb] {
        let req = http::Request::post(p.url("/v1/grading"))
            .header("authorization", "Bearer SECRET-TOKEN-123")
            .header("cookie", "PHPSESSID=SECRET-COOKIE-456")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        assert_eq!(p.send(req).await.status, 200);
        // Same input twice under the same key: same digest.
        p.post("/v1/grading", body).await;
    }
    let (ra, rb) = (wait_for(da.path(), 2).await, wait_for(db.path(), 2).await);
    assert_eq!(ra[0]["input_digest"], ra[1]["input_digest"]);
    assert_ne!(
        ra[0]["input_digest"], rb[0]["input_digest"],
        "digests are not keyed"
    );
    assert_ne!(ra[0]["key_id"], rb[0]["key_id"]);
    for dir in [da.path(), db.path()] {
        let bytes = std::fs::read(dir.join("decisions.jsonl")).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for secret in [
            "SECRET-TOKEN-123",
            "SECRET-COOKIE-456",
            "photosynthesis",
            "s-1042",
        ] {
            assert!(
                !text.contains(secret),
                "{secret} was written to the decision log"
            );
        }
    }
    pa.stop().await;
    pb.stop().await;
}

/// A clean log of `n` records in a fresh directory.
async fn make_log(n: usize, extra: &str) -> (tempfile::TempDir, MockAi) {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(dir.path(), KEY_A, extra),
    ))
    .await;
    for i in 0..n {
        proxy.get(&format!("/v1/recommendations?i={i}")).await;
    }
    wait_for(dir.path(), n).await;
    proxy.stop().await;
    (dir, ai)
}

fn rewrite_lines(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    f(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test]
async fn verify_catches_an_edit_a_deletion_and_a_swap_at_the_exact_record() {
    let (dir, _ai) = make_log(10, "").await;
    let log = dir.path().join("decisions.jsonl");
    let (ok, out) = verify(&[&log]);
    assert!(ok, "{out}");
    assert!(out.contains("10 records"), "{out}");

    let edited = dir.path().join("edited.jsonl");
    std::fs::copy(&log, &edited).unwrap();
    rewrite_lines(&edited, |l| {
        l[4] = l[4].replacen("\"status\":200", "\"status\":201", 1)
    });
    let (ok, out) = verify(&[&edited]);
    assert!(!ok);
    assert!(out.contains(":5:") && out.contains("Tampered"), "{out}");

    let deleted = dir.path().join("deleted.jsonl");
    std::fs::copy(&log, &deleted).unwrap();
    rewrite_lines(&deleted, |l| {
        l.remove(6);
    });
    let (ok, out) = verify(&[&deleted]);
    assert!(!ok);
    assert!(out.contains(":7:") && out.contains("Missing"), "{out}");

    let swapped = dir.path().join("swapped.jsonl");
    std::fs::copy(&log, &swapped).unwrap();
    rewrite_lines(&swapped, |l| l.swap(2, 3));
    let (ok, out) = verify(&[&swapped]);
    assert!(!ok);
    assert!(
        out.contains(":3:") && (out.contains("Missing") || out.contains("Reordered")),
        "{out}"
    );
}

#[tokio::test]
async fn rotation_keeps_the_chain_across_files() {
    let (dir, _ai) = make_log(60, "rotate_bytes = 4096\n").await;
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .collect();
    assert!(
        files.len() >= 3,
        "no rotation happened: {} file(s)",
        files.len()
    );
    let (ok, out) = verify(&[dir.path()]);
    assert!(ok, "{out}");
    assert!(out.contains("60 records"), "{out}");
    let mut rotated: Vec<_> = files
        .iter()
        .map(|e| e.path())
        .filter(|p| p.file_stem().unwrap().to_str().unwrap().contains('-'))
        .collect();
    rotated.sort();
    // A chain given from a later file on verifies on its own (older files expired).
    let live = dir.path().join("decisions.jsonl");
    let mut later: Vec<&Path> = rotated[1..].iter().map(|p| p.as_path()).collect();
    later.push(&live);
    assert!(verify(&later).0);
    // Removing a middle file is caught as missing records.
    std::fs::remove_file(&rotated[1]).unwrap();
    let (ok, out) = verify(&[dir.path()]);
    assert!(!ok, "a missing middle file went unnoticed");
    assert!(out.contains("Missing"), "{out}");
}

#[tokio::test]
async fn a_torn_last_line_is_truncated_on_restart_and_the_chain_resumes() {
    let (dir, ai) = make_log(5, "").await;
    let log = dir.path().join("decisions.jsonl");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(b"{\"schema_v\":1,\"event_id\":\"0191");
    std::fs::write(&log, &bytes).unwrap();
    assert!(!verify(&[&log]).0, "a torn line must not verify");
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(dir.path(), KEY_A, ""),
    ))
    .await;
    for _ in 0..3 {
        proxy.get("/v1/x").await;
    }
    wait_for(dir.path(), 8).await;
    proxy.stop().await;
    let (ok, out) = verify(&[&log]);
    assert!(ok, "{out}");
    let all = records(dir.path());
    assert!(
        all.iter().any(|r| r["event"] == "log_resumed"),
        "the truncation was not recorded"
    );
}

#[tokio::test]
async fn config_reload_and_admin_changes_are_recorded_in_the_chain() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = simple_config(&ai.url(), "", &audit_section(dir.path(), KEY_A, ""));
    let proxy = TestProxy::start(&cfg).await;
    std::fs::write(
        &proxy.config_path,
        cfg.replace("timeout_ms = 2000", "timeout_ms = 1500"),
    )
    .unwrap();
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        200
    );
    assert_eq!(
        proxy
            .admin_post("/admin/routes/ai/ai", r#"{"enabled":false}"#, None)
            .await
            .status,
        200
    );
    proxy.stop().await;
    let events: Vec<_> = records(dir.path())
        .into_iter()
        .filter(|r| r.get("event").is_some())
        .collect();
    let reload = events
        .iter()
        .find(|e| e["event"] == "config_reload")
        .expect("no config_reload event");
    assert_ne!(reload["config_hash_before"], reload["config_hash_after"]);
    assert_eq!(reload["config_gen"], 2);
    let admin = events
        .iter()
        .find(|e| e["event"] == "admin_change")
        .expect("no admin_change event");
    assert_eq!(admin["detail"]["action"], "ai_enabled");
    assert_eq!(admin["actor"], "anonymous");
    assert!(verify(&[dir.path()]).0);
}

#[tokio::test]
async fn a_failing_disk_turns_readiness_off_in_strict_mode_and_requests_still_get_answers() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), KEY_A).unwrap();
    // /dev/full: every write fails with ENOSPC, as a full disk does.
    let extra = format!(
        "[audit]\npath = \"/dev/full\"\nhmac_key_file = \"{}\"\n",
        dir.path().join("key").display()
    );
    // Only `strict` readiness turns 503 for it (the default reports it as degraded:
    // tests/readiness.rs).
    let cfg = simple_config(&ai.url(), "", &extra).replacen(
        "watch_config = true\n",
        "watch_config = true\nreadiness = \"strict\"\n",
        1,
    );
    let proxy = TestProxy::start(&cfg).await;
    assert_eq!(proxy.get("/v1/x").await.status, 200);
    let mut ready = 200;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        ready = proxy.admin_get("/readyz").await.unwrap().status;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        ready, 503,
        "readiness stayed on while the log could not write"
    );
    // Readiness goes off a moment before the error is counted: wait for the count.
    let errors = wait_metric(&proxy, "breakwater_audit_write_errors_total", |e| e > 0.0).await;
    assert!(errors > 0.0, "the failed writes were not counted");
    assert_eq!(proxy.get("/v1/x").await.status, 200);
}

#[tokio::test]
async fn kill_9_mid_burst_leaves_a_log_that_verifies_after_restart() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bw = ProcessProxy::new(
        dir.path(),
        &simple_config(&ai.url(), "", &audit_section(dir.path(), KEY_A, "")),
    );
    let mut child = bw.spawn().await;
    // A bounded burst from 8 clients; kill -9 while it runs.
    let url = bw.url("/v1/recommendations");
    let mut burst = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        burst.push(tokio::spawn(async move {
            let client = http_client();
            for _ in 0..2000 {
                if client.get(url.parse().unwrap()).await.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    for b in burst {
        b.await.unwrap();
    }
    let before = decisions(dir.path()).len();
    assert!(before > 0, "nothing was logged before the kill");

    let child = bw.spawn().await;
    for _ in 0..5 {
        http_client().get(url.parse().unwrap()).await.unwrap();
    }
    // SIGTERM: graceful, flushes the log.
    terminate(child);
    let (ok, out) = verify(&[dir.path()]);
    assert!(ok, "{out}");
    assert!(decisions(dir.path()).len() >= before + 5);
}

#[tokio::test]
async fn written_lines_are_copied_to_rabbitmq_in_order() {
    if !rabbit::available().await {
        return;
    }
    use lapin::options::*;
    let (_conn, ch) = rabbit::channel().await;
    let name = rabbit::unique_route("audit_copy");
    let exchange = format!("test.audit.{name}");
    // A collector's queue, bound before anything is published.
    let queue = format!("test.audit.{name}");
    rabbit::bound_queue(&ch, &exchange, &queue, "audit.#").await;

    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let publish = format!(
        "publish_url = \"{}\"\npublish_exchange = \"{exchange}\"\n",
        rabbit::URL
    );
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(dir.path(), KEY_A, &publish),
    ))
    .await;
    for i in 0..20 {
        proxy
            .post("/v1/grading", format!("{{\"essay\":{i}}}"))
            .await;
    }
    wait_for(dir.path(), 20).await;
    let file = std::fs::read_to_string(dir.path().join("decisions.jsonl")).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    assert!(lines.len() >= 20);

    let mut copies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while copies.len() < lines.len() && tokio::time::Instant::now() < deadline {
        for m in rabbit::drain(&ch, &queue).await {
            assert_eq!(m.delivery.routing_key.as_str(), "audit.record");
            assert_eq!(
                m.delivery.properties.delivery_mode(),
                &Some(2),
                "persistent"
            );
            copies.push(String::from_utf8(m.delivery.data.clone()).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same bytes as the file, in the file's order: a collector can verify the chain.
    assert_eq!(copies, lines);
    // The copies reach the queue before their confirms reach breakwater, which counts
    // them only then: wait for the count.
    let want = lines.len() as f64;
    let published = wait_metric(&proxy, "breakwater_audit_published_total", |p| p >= want).await;
    assert!(
        published >= want,
        "{published} copies counted as published, {want} reached the queue"
    );
    proxy.stop().await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}

#[tokio::test]
async fn an_unreachable_broker_never_holds_the_log_and_counts_what_it_missed() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1; the copies' buffer holds two lines.
    let publish =
        "publish_url = \"amqp://guest:guest@127.0.0.1:1/%2f\"\npublish_buffer = 2\n".to_string();
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(dir.path(), KEY_A, &publish),
    ))
    .await;
    let dropped_before = metric(
        &proxy.metrics().await,
        "breakwater_audit_publish_dropped_total",
    );
    for _ in 0..10 {
        assert_eq!(proxy.get("/v1/recommendations").await.status, 200);
    }
    assert_eq!(wait_for(dir.path(), 10).await.len(), 10);
    // A line is in the file before its fsync returns, and only then is it offered to the
    // copies' buffer (and counted when it does not fit): wait for the count it asserts.
    // Of the ten lines, two fit the buffer; the other eight must be counted as missed.
    let dropped = wait_metric(&proxy, "breakwater_audit_publish_dropped_total", |d| {
        d >= dropped_before + 8.0
    })
    .await;
    assert!(
        dropped >= dropped_before + 8.0,
        "{} copies counted as missed, want at least 8",
        dropped - dropped_before
    );
    proxy.stop().await;
}

/// A request for `/headers` (the mock answers with the request's headers) as one user.
fn as_user(proxy: &TestProxy, token: &str, cookie: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(proxy.url("/headers?page=1"))
        .header("authorization", format!("Bearer {token}"))
        .header("cookie", format!("PHPSESSID={cookie}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn the_answer_cache_never_serves_one_users_answer_to_another() {
    let ai = MockAi::start().await;
    let route = "[[routes.fallback]]\nkind = \"cache\"\nttl_s = 60\n[[routes.fallback]]\nkind = \"static\"\nbody = '{\"source\":\"static\"}'\n";
    let proxy = TestProxy::start(&simple_config(&ai.url(), route, "")).await;
    // User A's answer (it carries A's token: the mock echoes the headers) is cached.
    let a = proxy
        .send(as_user(&proxy, "alice-token", "alice-session"))
        .await;
    assert_eq!(a.outcome(), "ai");
    assert!(String::from_utf8_lossy(&a.body).contains("alice-token"));

    ai.set_error_rate(1.0, 503);
    // Another token, and the same token with another session cookie: neither gets A's
    // answer; both get the next fallback.
    for (token, cookie) in [("bob-token", "bob-session"), ("alice-token", "bob-session")] {
        let b = proxy.send(as_user(&proxy, token, cookie)).await;
        let body = String::from_utf8_lossy(&b.body).to_string();
        assert!(
            !body.contains("alice-session"),
            "a user with {token}/{cookie} received user A's cached answer: {body}"
        );
        assert_eq!(b.header("x-breakwater-fallback"), Some("static"), "{body}");
    }
    // User A still gets the cached answer.
    let a = proxy
        .send(as_user(&proxy, "alice-token", "alice-session"))
        .await;
    assert_eq!(a.header("x-breakwater-fallback"), Some("cache"));
    assert!(String::from_utf8_lossy(&a.body).contains("alice-token"));
    proxy.stop().await;
}

/// A small tmpfs mounted on a fresh directory (unmounted when dropped): a disk that
/// really fills. `None`, with a message, where mounting is not permitted (outside CI).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = format!("{other:?}");
                assert_ne!(
                    std::env::var("CI").as_deref(),
                    Ok("true"),
                    "cannot mount a tmpfs in CI: {why}"
                );
                eprintln!("skipped: cannot mount a tmpfs here ({why})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file, leaving about `leave` bytes free.
    fn fill(&self, leave: u64) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = vec![0u8; 4096];
        let total = nix_free_bytes(self.path()).saturating_sub(leave);
        let mut written = 0;
        while written < total {
            if f.write_all(&chunk).is_err() {
                break;
            }
            written += chunk.len() as u64;
        }
        let _ = f.sync_all();
    }

    fn free_up(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

/// Free bytes of the file system holding `dir`, from `df`.
fn nix_free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a writer thread may still hold the log open for a moment.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}

/// Polls `/metrics` until the (unlabelled) counter `name` satisfies `ok`, for at most 20 s;
/// returns its last value. Counters move a moment after what the test saw (a line in the
/// file, an answer), so a test waits for the value it asserts instead of reading it once.
async fn wait_metric(proxy: &TestProxy, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(&proxy.metrics().await, name);
        if ok(v) || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// What the chain says was lost: the sum of its `records_lost` events.
fn lost_in_chain(dir: &Path) -> u64 {
    records(dir)
        .iter()
        .filter(|r| r["event"] == "records_lost")
        .map(|r| r["detail"]["count"].as_u64().unwrap())
        .sum()
}

/// `n` GETs from 16 clients at once; returns how many were answered.
async fn burst(proxy: &TestProxy, n: usize) -> usize {
    let url = proxy.url("/v1/recommendations");
    let mut tasks = Vec::new();
    for c in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut ok = 0;
            for _ in (c..n).step_by(16) {
                if let Ok(r) = client.get(url.parse().unwrap()).await {
                    if r.status() == 200 && r.into_body().collect().await.is_ok() {
                        ok += 1;
                    }
                }
            }
            ok
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    answered
}

#[tokio::test]
async fn a_full_disk_loses_records_only_counted_and_chained_and_shutdown_keeps_its_grace() {
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let ai = MockAi::start().await;
    let audit = audit_section(
        disk.path(),
        KEY_A,
        "on_full = \"block\"\nchannel_capacity = 64\nfsync_max_records = 16\nblock_timeout_ms = 20\n",
    );
    let cfg = simple_config(&ai.url(), "", &audit).replace(
        "watch_config = true\n",
        "watch_config = true\nshutdown_grace_ms = 2000\nreadiness = \"strict\"\n",
    );
    let proxy = TestProxy::start(&cfg).await;
    // Room for a hundred records or so; the rest of the burst meets a full disk.
    disk.fill(64 * 1024);
    let answered = burst(&proxy, 2500).await;
    assert_eq!(
        answered, 2500,
        "requests must be answered while the disk is full"
    );
    assert_eq!(
        proxy.admin_get("/readyz").await.unwrap().status,
        503,
        "readiness stayed on while records were being lost"
    );
    let dropped = wait_metric(&proxy, "breakwater_audit_dropped_total", |d| d > 0.0).await;
    assert!(dropped > 0.0, "records were lost without being counted");

    // The disk is back: the writer catches up and chains what was lost.
    disk.free_up();
    let mut seen = (0, 0);
    for _ in 0..300 {
        seen = (decisions(disk.path()).len(), lost_in_chain(disk.path()));
        if seen.0 as u64 + seen.1 >= answered as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (recorded, lost) = seen;
    assert_eq!(
        recorded as u64 + lost,
        answered as u64,
        "answered requests != records ({recorded}) + counted losses ({lost})"
    );
    assert!(lost > 0, "nothing was lost: the disk never filled");
    let dropped = metric(&proxy.metrics().await, "breakwater_audit_dropped_total");
    assert_eq!(dropped as u64, lost, "the metric and the chain disagree");
    let (ok, out) = verify(&[disk.path()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("records_lost") && out.contains(&lost.to_string()),
        "verify did not report the loss: {out}"
    );
    for _ in 0..100 {
        if proxy.admin_get("/readyz").await.unwrap().status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.admin_get("/readyz").await.unwrap().status, 200);

    // A dead disk at shutdown: the writer is stuck, and shutdown still keeps its grace.
    disk.fill(0);
    burst(&proxy, 300).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), proxy.stop())
        .await
        .expect("shutdown hung on a dead disk");
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "shutdown took {:?}, more than its 2 s grace",
        started.elapsed()
    );
}

/// `audit verify --public-key`: its exit code and output.
fn verify_signed(path: &Path, public: &Path) -> (i32, String) {
    let out = Command::new(breakwater_bin())
        .args(["audit", "verify", "--public-key"])
        .arg(public)
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// What someone without the signing key can do: re-chain every record from line one
/// (numbered anew; checkpoints' heads moved along, so only their signatures can tell),
/// each checkpoint
/// then passed to `sign`.
fn rechain(
    recs: &[serde_json::Value],
    mut sign: impl FnMut(&mut serde_json::Value),
) -> Vec<String> {
    use sha2::Digest;
    let mut prev = recs[0]["prev_hash"].as_str().unwrap().to_string();
    let first_seq = recs[0]["seq"].as_u64().unwrap();
    let mut out = Vec::new();
    for (seq, r) in (first_seq..).zip(recs) {
        let mut r = r.clone();
        r.as_object_mut().unwrap().remove("hash");
        r["prev_hash"] = prev.clone().into();
        r["seq"] = seq.into();
        if r["event"] == "checkpoint" {
            r["detail"]["head"] = prev.clone().into();
            r["detail"]["count"] = (seq - 1).into();
            sign(&mut r);
        }
        let canonical = serde_json::to_string(&r).unwrap();
        let hash = hex::encode(sha2::Sha256::digest(format!("{prev}{canonical}")));
        out.push(format!(
            "{},\"hash\":\"{hash}\"}}",
            &canonical[..canonical.len() - 1]
        ));
        prev = hash;
    }
    out
}

/// Issue 15: signed checkpoints. A clean log ends at a checkpoint and verifies under the
/// public key; a cut tail, a log re-chained from line one, one without its checkpoints and
/// one whose checkpoints another key signed all pass the plain chain check, and all fail
/// (or, for the cut, are reported unanchored with exit 2) under the key.
#[tokio::test]
async fn signed_checkpoints_catch_a_cut_tail_a_rewritten_log_and_a_forged_checkpoint() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(&keys.path().join("keys"));
    assert_eq!(mode(&key), 0o600, "signing.key is not private");
    assert_eq!(mode(&keys.path().join("keys")), 0o700);
    assert!(std::fs::read_to_string(&public).unwrap().trim().len() == 64);
    // A second keygen would orphan the checkpoints the first key signed.
    let again = Command::new(breakwater_bin())
        .args(["audit", "keygen"])
        .arg(keys.path().join("keys"))
        .output()
        .unwrap();
    assert!(!again.status.success(), "keygen replaced an existing key");

    let extra = format!(
        "signing_key_file = \"{}\"\ncheckpoint_interval_ms = 50\n",
        key.display()
    );
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(dir.path(), KEY_A, &extra),
    ))
    .await;
    for i in 0..8 {
        assert_eq!(
            proxy
                .post("/v1/grading", format!("{{\"n\":{i}}}"))
                .await
                .status,
            200
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    proxy.stop().await;
    let recs = records(dir.path());
    let is_cp = |r: &serde_json::Value| r["event"] == "checkpoint";
    let cps = recs.iter().filter(|r| is_cp(r)).count();
    assert!(cps >= 2, "{cps} checkpoint(s): none by the interval");
    assert!(
        is_cp(recs.last().unwrap()),
        "a clean shutdown ends at a checkpoint"
    );
    let last = recs.last().unwrap();
    assert_eq!(
        last["detail"]["count"].as_u64().unwrap() + 1,
        last["seq"].as_u64().unwrap()
    );
    assert_eq!(last["detail"]["head"], recs[recs.len() - 2]["hash"]);

    let log = dir.path().join("decisions.jsonl");
    let (code, out) = verify_signed(&log, &public);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ends at a checkpoint") && out.contains("proves"),
        "{out}"
    );
    assert!(out.contains(recs[0]["ts_start"].as_str().unwrap()), "{out}");

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("decisions.jsonl");

    // A cut tail: the final checkpoint is gone (two never follow each other, so a
    // record is left after the last one).
    let kept = &lines[..lines.len() - 1];
    write_lines(&copy, kept);
    assert!(
        verify(&[&copy]).0,
        "the plain chain check should not see a cut"
    );
    let unanchored = recs[..recs.len() - 1]
        .iter()
        .rev()
        .take_while(|r| !is_cp(r))
        .count();
    assert!(unanchored >= 1);
    let (code, out) = verify_signed(&copy, &public);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("UNANCHORED") && out.contains(&format!("{unanchored} record(s) after")),
        "{out}"
    );

    // Rewritten from line one: a decision's status changed, everything re-chained.
    let mut edited = recs.clone();
    let first = edited
        .iter()
        .position(|r| r.get("request_id").is_some())
        .unwrap();
    edited[first]["status"] = 500.into();
    write_lines(&copy, &rechain(&edited, |_| {}));
    assert!(
        verify(&[&copy]).0,
        "the re-chained log should pass the plain check"
    );
    let (code, out) = verify_signed(&copy, &public);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BadCheckpoint") && out.contains("does not verify"),
        "{out}"
    );

    // Rewritten and its checkpoints dropped: nothing signed by the key is left.
    let bare: Vec<_> = edited.iter().filter(|r| !is_cp(r)).cloned().collect();
    write_lines(&copy, &rechain(&bare, |_| {}));
    let (code, out) = verify_signed(&copy, &public);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NoCheckpoint"), "{out}");

    // Forged: re-signed with another key, under the real key's id and under its own.
    let (other, _) = keygen(&keys.path().join("other"));
    let hex_seed = std::fs::read_to_string(&other).unwrap();
    let seed: [u8; 32] = hex::decode(hex_seed.trim()).unwrap().try_into().unwrap();
    let forger = ed25519_dalek::SigningKey::from_bytes(&seed);
    let real_id = last["detail"]["key_id"].as_str().unwrap().to_string();
    for key_id in [real_id.clone(), "0123456789abcdef".to_string()] {
        let forged = rechain(&edited, |cp| {
            use ed25519_dalek::Signer;
            cp["detail"]["key_id"] = key_id.clone().into();
            let msg = format!(
                "breakwater-checkpoint-v1\n{}\n{}\n{}\n{}\n{}",
                cp["instance"].as_str().unwrap(),
                cp["detail"]["count"],
                cp["detail"]["head"].as_str().unwrap(),
                cp["ts"].as_str().unwrap(),
                key_id
            );
            cp["detail"]["signature"] = hex::encode(forger.sign(msg.as_bytes()).to_bytes()).into();
        });
        write_lines(&copy, &forged);
        let (code, out) = verify_signed(&copy, &public);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("BadCheckpoint"), "{out}");
    }
}

/// Issue 15: the change trail. A reload (a changed route) and an admin change both appear
/// in `audit changes` with the config hashes before and after, the routes changed and the
/// actor; `--since` after them leaves them out.
#[tokio::test]
async fn audit_changes_shows_a_reload_and_an_admin_change_with_their_hashes() {
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = simple_config(&ai.url(), "", &audit_section(dir.path(), KEY_A, ""));
    let proxy = TestProxy::start(&cfg).await;
    let before = proxy.admin_get("/admin/config").await.unwrap().json()["hash"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(
        &proxy.config_path,
        cfg.replace("timeout_ms = 2000", "timeout_ms = 1500"),
    )
    .unwrap();
    assert_eq!(
        proxy.admin_post("/admin/reload", "", None).await.status,
        200
    );
    let after = proxy.admin_get("/admin/config").await.unwrap().json()["hash"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(before, after);
    assert_eq!(
        proxy
            .admin_post("/admin/routes/ai/ai", r#"{"enabled":false}"#, None)
            .await
            .status,
        200
    );
    proxy.stop().await;
    let changes = |extra: &[&str]| {
        let out = Command::new(breakwater_bin())
            .args(["audit", "changes"])
            .args(extra)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = changes(&[]);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("TIME"), "{table}");
    let reload = rows
        .iter()
        .find(|r| r.contains("config_reload"))
        .unwrap_or_else(|| panic!("no reload row:\n{table}"));
    assert!(
        reload.contains(&format!("{} → {}", &before[..12], &after[..12])),
        "{table}"
    );
    assert!(
        reload.contains(r#"routes_changed={"added":[],"changed":["ai"],"removed":[]}"#),
        "{table}"
    );
    assert!(
        reload.contains("anonymous"),
        "the admin reload's actor: {table}"
    );
    let admin = rows
        .iter()
        .find(|r| r.contains("admin_change"))
        .unwrap_or_else(|| panic!("no admin row:\n{table}"));
    assert!(
        admin.contains(&format!("{} → {}", &after[..12], &after[..12])),
        "{table}"
    );
    assert!(
        admin.contains("action=ai_enabled") && admin.contains("anonymous"),
        "{table}"
    );
    assert_eq!(rows.len(), 3, "decisions are not changes: {table}");
    let later = changes(&["--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(later.lines().count(), 1, "{later}");
}

/// Issue 15: checkpoints are lines of the chain, so `publish_url` carries them to RabbitMQ
/// too, an external witness of the head: the final checkpoint of a clean shutdown arrives,
/// byte for byte, after every record it anchors.
#[tokio::test]
async fn checkpoints_reach_rabbitmq_with_the_lines_they_anchor() {
    if !rabbit::available().await {
        return;
    }
    use lapin::options::*;
    let (_conn, ch) = rabbit::channel().await;
    let name = rabbit::unique_route("audit_checkpoint");
    let exchange = format!("test.audit.{name}");
    let queue = format!("test.audit.{name}");
    rabbit::bound_queue(&ch, &exchange, &queue, "audit.#").await;
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(&dir.path().join("keys"));
    let extra = format!(
        "publish_url = \"{}\"\npublish_exchange = \"{exchange}\"\nsigning_key_file = \"{}\"\n",
        rabbit::URL,
        key.display()
    );
    let proxy = TestProxy::start(&simple_config(
        &ai.url(),
        "",
        &audit_section(dir.path(), KEY_A, &extra),
    ))
    .await;
    for i in 0..5 {
        proxy
            .post("/v1/grading", format!("{{\"essay\":{i}}}"))
            .await;
    }
    proxy.stop().await;
    let log = dir.path().join("decisions.jsonl");
    let file = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    assert!(lines.last().unwrap().contains("\"event\":\"checkpoint\""));
    let mut copies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while copies.len() < lines.len() && tokio::time::Instant::now() < deadline {
        for m in rabbit::drain(&ch, &queue).await {
            copies.push(String::from_utf8(m.delivery.data.clone()).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        copies, lines,
        "the checkpoint did not travel with the lines"
    );
    // The copies verify on their own, anchored by the witnessed checkpoint.
    let copy = dir.path().join("copy.jsonl");
    write_lines(&copy, &copies);
    let (code, out) = verify_signed(&copy, &public);
    assert_eq!(code, 0, "{out}");
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
}

//! Local and admin security: the files breakwater writes are private to its user whatever
//! the umask, the admin API refuses (and logs, and counts) mutating calls without the
//! token and changes nothing, and no secret shows in `/admin/config` or `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

const STATIC_FB: &str =
    "[[routes.fallback]]\nkind = \"static\"\nstatus = 202\nbody = '{\"status\":\"queued\"}'\n";

/// The proxy process, killed if the test fails before it ends it: a leftover child would
/// hold the test runner's output pipe open.
struct Reaped(Option<std::process::Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every file and directory under `root` (not `root` itself).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn post(url: String, body: &str) -> u16 {
    http_client()
        .request(
            http::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Under umask 000 (the worst case: everything world-writable by default), every file
/// breakwater writes is 0600 and every directory it creates 0700: the decision log and its
/// rotated files, the spool segments, cursor and lane positions, and parked messages.
#[tokio::test]
async fn files_are_private_to_breakwater_whatever_the_umask() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 500);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let key_file = dir.path().join("audit.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let route_extra = format!("replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n{STATIC_FB}");
    let extra = format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nrotate_bytes = 4096\nfsync_interval_ms = 10\n\n[dlq]\nspool_dir = \"{}\"\nreplay_rate_per_s = 200\nmax_replay_attempts = 2\n",
        state.join("audit/decisions.jsonl").display(),
        key_file.display(),
        state.join("spool").display()
    );
    let proxy = ProcessProxy::new(dir.path(), &simple_config(&ai.url(), &route_extra, &extra));
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("umask 000 && exec \"$0\" --config \"$1\"")
        .arg(breakwater_bin())
        .arg(&proxy.config_path)
        .env("RUST_LOG", "error");
    let child = Reaped(Some(proxy.spawn_command(cmd).await));

    // One failed replayable request: spooled. Then enough traffic to rotate the log.
    assert_eq!(post(proxy.url("/v1/grade"), "{\"essay\":\"x\"}").await, 202);
    for _ in 0..40 {
        let r = http_client()
            .request(
                http::Request::get(proxy.url("/v1/read"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let _ = r.into_body().collect().await;
    }
    // The AI now refuses the message for good: replayed once, then parked.
    ai.set_error_rate(1.0, 422);
    let admin = format!("http://127.0.0.1:{}", proxy.admin);
    assert_eq!(
        post(
            format!("{admin}/admin/routes/ai/breaker"),
            "{\"state\":\"forced_closed\"}"
        )
        .await,
        200
    );
    let parked = state.join("spool/parked/ai.park");
    assert!(
        wait_until(Duration::from_secs(20), || parked.exists()).await,
        "the message was never parked: {:?}",
        walk(&state)
    );
    let audit_dir = state.join("audit");
    assert!(
        wait_until(Duration::from_secs(20), || {
            std::fs::read_dir(&audit_dir).is_ok_and(|d| d.count() >= 2)
        })
        .await,
        "the decision log never rotated: {:?}",
        walk(&state)
    );
    drop(child);

    let mut all = walk(&state);
    // state/ itself did not exist either: breakwater created it.
    all.insert(0, state.clone());
    let names: Vec<String> = all
        .iter()
        .map(|p| {
            let n = p.strip_prefix(&state).unwrap().display().to_string();
            if n.is_empty() {
                "state".to_string()
            } else {
                n
            }
        })
        .collect();
    for want in [
        "audit",
        "audit/decisions.jsonl",
        "spool",
        "spool/parked",
        "spool/parked/ai.park",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("spool/") && n.ends_with(".seg")),
        "no spool segment: {names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("audit/decisions") && n != "audit/decisions.jsonl"),
        "no rotated decision log: {names:?}"
    );
    let wrong: Vec<String> = all
        .iter()
        .zip(&names)
        .filter_map(|(p, n)| {
            let want = if p.is_dir() { 0o700 } else { 0o600 };
            (mode(p) != want).then(|| format!("{n}: {:o} (want {want:o})", mode(p)))
        })
        .collect();
    assert!(wrong.is_empty(), "not private: {wrong:#?}");
}

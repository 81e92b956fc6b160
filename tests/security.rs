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

/// One admin call through a real client: status and body (JSON when it is JSON).
async fn call(
    admin: u16,
    method: &str,
    path: &str,
    body: &str,
    authorization: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{admin}{path}"))
        .header("content-type", "application/json");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = http_client()
        .request(req.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}

fn inspect(spool: &Path) -> String {
    let out = std::process::Command::new(breakwater_bin())
        .args(["spool", "inspect"])
        .arg(spool)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn replays(ai: &MockAi) -> u64 {
    ai.count_by_header("idempotency-key").values().sum()
}

/// `N what` from the first line of `spool inspect`: "..., 1 pending, 0 corrupt, 1 parked, ...".
fn summary_count(inspect: &str, what: &str) -> u64 {
    let first = inspect.lines().next().unwrap_or("");
    first
        .split(", ")
        .find_map(|part| part.strip_suffix(&format!(" {what}")))
        .and_then(|n| n.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {what} count in {first:?}"))
}

/// Everything a mutating admin call could change, as operators see it.
async fn admin_state(admin: u16, spool: &Path, ai: &MockAi) -> serde_json::Value {
    let (_, config) = call(admin, "GET", "/admin/config", "", None).await;
    let (_, inv) = call(admin, "GET", "/admin/inventory", "", None).await;
    let (_, dlq) = call(admin, "GET", "/admin/dlq", "", None).await;
    let route = &inv["routes"][0];
    let text = inspect(spool);
    serde_json::json!({
        "generation": config["generation"],
        "hash": config["hash"],
        "breaker": route["breaker_state"],
        "ai_enabled": route["ai_enabled"],
        "weight": route["variants"][0]["weight"],
        "paused": dlq["routes"]["ai"]["paused"],
        "parked": summary_count(&text, "parked"),
        "pending": summary_count(&text, "pending"),
        "replays": replays(ai),
    })
}

const RIGHT: &str = "right-token-0123456789abcdef";
const WRONG: &str = "wrong-token-0123456789abcdef";

/// With `admin_token_file` set, every mutating endpoint answers a call without the token,
/// with a wrong one or with the right one cut short by 401, and nothing changes: config
/// generation, breaker, kill switch, canary weight, DLQ pause, parked and pending messages,
/// replays at the AI. Each refusal is a warn line naming the endpoint and the peer (never
/// the token) and counts in `breakwater_admin_unauthorized_total{path}`. The same calls
/// with the token then do change each of these (so the checks can fail).
#[tokio::test]
async fn admin_mutations_without_the_token_get_401_change_nothing_and_are_logged_and_counted() {
    let ai = MockAi::start().await;
    ai.set_error_rate(1.0, 500);
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{RIGHT}\n")).unwrap();
    let route_extra = format!(
        "replayable = true\n[routes.breaker]\nconsecutive_failures = 1\nopen_ms = 600000\nopen_max_ms = 600000\n{STATIC_FB}[[routes.variants]]\nname = \"v2\"\nupstream = \"ai2\"\nweight = 10\n"
    );
    let extra = format!(
        "[upstreams.ai2]\nurl = \"{}\"\n[dlq]\nspool_dir = \"{}\"\nreplay_rate_per_s = 200\nmax_replay_attempts = 1\n",
        ai.url(),
        spool.display()
    );
    let config = simple_config(&ai.url(), &route_extra, &extra).replace(
        "watch_config = true\n",
        &format!(
            "watch_config = false\nadmin_token_file = \"{}\"\n",
            token_file.display()
        ),
    );
    let proxy = ProcessProxy::new(dir.path(), &config);
    let log = dir.path().join("breakwater.log");
    let mut cmd = std::process::Command::new(breakwater_bin());
    cmd.arg("--config")
        .arg(&proxy.config_path)
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(&log).unwrap());
    let _child = Reaped(Some(proxy.spawn_command(cmd).await));
    let admin = proxy.admin;
    let bearer = format!("Bearer {RIGHT}");

    // Set the scene: one message parked (the AI refused its replay with a 422), replay
    // paused, one message pending behind the pause, the AI healthy again.
    let grade = |essay: &'static str| {
        let url = proxy.url("/v1/grade");
        async move {
            let r = http_client()
                .request(
                    http::Request::post(url)
                        .body(Full::new(Bytes::from(format!("{{\"essay\":\"{essay}\"}}"))))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(r.headers()["x-breakwater-dlq"], "spooled");
        }
    };
    grade("one").await;
    ai.set_error_rate(1.0, 422);
    let (s, _) = call(
        admin,
        "POST",
        "/admin/routes/ai/breaker",
        r#"{"state":"forced_closed"}"#,
        Some(&bearer),
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        wait_until(Duration::from_secs(20), || inspect(&spool)
            .contains("1 parked"))
        .await,
        "{}",
        inspect(&spool)
    );
    let (s, _) = call(
        admin,
        "POST",
        "/admin/dlq/pause?route=ai",
        "",
        Some(&bearer),
    )
    .await;
    assert_eq!(s, 200);
    ai.set_error_rate(1.0, 500);
    grade("two").await;
    ai.recover();
    // A change on disk that only a reload would apply.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        text.replace("timeout_ms = 2000", "timeout_ms = 2500"),
    )
    .unwrap();

    let wrong = format!("Bearer {WRONG}");
    let short = format!("Bearer {}", &RIGHT[..RIGHT.len() - 1]);
    let bad_tokens: [Option<&str>; 4] = [None, Some(&wrong), Some(&short), Some("Bearer ")];
    let mutations: &[(&str, &str, &str)] = &[
        ("/admin/reload", "", "/admin/reload"),
        (
            "/admin/routes/ai/breaker",
            r#"{"state":"forced_open"}"#,
            "/admin/routes/{name}/breaker",
        ),
        (
            "/admin/routes/ai/ai",
            r#"{"enabled":false}"#,
            "/admin/routes/{name}/ai",
        ),
        (
            "/admin/routes/ai/variants/v2",
            r#"{"weight":50}"#,
            "/admin/routes/{name}/variants/{variant}",
        ),
        ("/admin/dlq/replay?route=ai", "", "/admin/dlq/replay"),
        ("/admin/dlq/resume?route=ai", "", "/admin/dlq/resume"),
        (
            "/admin/dlq/parked/requeue?route=ai",
            "",
            "/admin/dlq/parked/requeue",
        ),
    ];
    let refuse_all = |calls: Vec<(&'static str, &'static str)>| async move {
        for (path, body) in calls {
            for token in bad_tokens {
                let (s, json) = call(admin, "POST", path, body, token).await;
                assert_eq!(s, 401, "{path} with {token:?}: {json}");
                assert!(json["error"]["message"].as_str().unwrap().contains("token"));
            }
        }
    };
    let before = admin_state(admin, &spool, &ai).await;
    assert_eq!(before["parked"], 1, "{before}");
    assert_eq!(before["pending"], 1, "{before}");
    assert_eq!(before["paused"], true, "{before}");
    assert_eq!(before["breaker"], "forced_closed", "{before}");
    refuse_all(mutations.iter().map(|(p, b, _)| (*p, *b)).collect()).await;
    // Replays run in the background: give a wrongly accepted trigger or resume time to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(admin_state(admin, &spool, &ai).await, before);

    // With the token, replay (past the pause) and resume do their work...
    let (s, _) = call(
        admin,
        "POST",
        "/admin/dlq/replay?route=ai",
        "",
        Some(&bearer),
    )
    .await;
    assert_eq!(s, 200);
    let replayed = before["replays"].as_u64().unwrap() + 1;
    assert!(
        wait_until(Duration::from_secs(10), || replays(&ai) >= replayed).await,
        "an authorised replay trigger replayed nothing"
    );
    let (s, _) = call(
        admin,
        "POST",
        "/admin/dlq/resume?route=ai",
        "",
        Some(&bearer),
    )
    .await;
    assert_eq!(s, 200);
    // ... and pause is only a change when not paused.
    let resumed = admin_state(admin, &spool, &ai).await;
    assert_eq!(resumed["paused"], false, "{resumed}");
    refuse_all(vec![("/admin/dlq/pause?route=ai", "")]).await;
    // Any other mutating method on any path is refused before it is even routed.
    refuse_all(vec![("/admin/config", "{}"), ("/admin/no-such-thing", "")]).await;
    let (s, _) = call(admin, "DELETE", "/admin/config", "", None).await;
    assert_eq!(s, 401);
    assert_eq!(admin_state(admin, &spool, &ai).await, resumed);

    // Counted per endpoint template, and exactly: this process made no other refusal.
    let (_, metrics) = call(admin, "GET", "/metrics", "", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    let count = |endpoint: &str| -> u64 {
        let prefix = format!("breakwater_admin_unauthorized_total{{path=\"{endpoint}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}in:\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    for (_, _, endpoint) in mutations {
        assert_eq!(count(endpoint), bad_tokens.len() as u64, "{endpoint}");
    }
    assert_eq!(count("/admin/dlq/pause"), bad_tokens.len() as u64);
    assert_eq!(count("other"), 2 * bad_tokens.len() as u64 + 1);

    // Logged, with the endpoint and the peer, and never a token.
    let logged = std::fs::read_to_string(&log).unwrap();
    let refusals: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("admin call refused"))
        .collect();
    assert_eq!(
        refusals.len(),
        (mutations.len() + 1 + 2) * bad_tokens.len() + 1,
        "{logged}"
    );
    for (_, _, endpoint) in mutations {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(&format!("endpoint=\"{endpoint}\""))
                    || l.contains(&format!("endpoint={endpoint}"))),
            "no refusal logged for {endpoint}:\n{logged}"
        );
    }
    assert!(
        refusals.iter().all(|l| l.contains("peer=127.0.0.1:")),
        "{logged}"
    );
    for secret in [RIGHT, WRONG, &RIGHT[..RIGHT.len() - 1]] {
        assert!(!logged.contains(secret), "a token is in the log:\n{logged}");
    }

    // The other calls with the token do change each thing checked above.
    let ok = |path: &'static str, body: &'static str| {
        let bearer = bearer.clone();
        async move {
            let (s, json) = call(admin, "POST", path, body, Some(&bearer)).await;
            assert_eq!(s, 200, "{path}: {json}");
        }
    };
    ok("/admin/dlq/pause?route=ai", "").await;
    ok("/admin/dlq/parked/requeue?route=ai", "").await;
    ok("/admin/reload", "").await;
    ok("/admin/routes/ai/breaker", r#"{"state":"forced_open"}"#).await;
    ok("/admin/routes/ai/variants/v2", r#"{"weight":50}"#).await;
    ok("/admin/routes/ai/ai", r#"{"enabled":false}"#).await;
    let after = admin_state(admin, &spool, &ai).await;
    assert_eq!(after["paused"], true, "{after}");
    assert_eq!(after["parked"], 0, "{after}");
    assert_eq!(after["pending"], 1, "the requeued message: {after}");
    assert_eq!(
        after["generation"].as_u64().unwrap(),
        before["generation"].as_u64().unwrap() + 1,
        "{after}"
    );
    assert_ne!(after["hash"], before["hash"]);
    assert_eq!(after["breaker"], "forced_open", "{after}");
    assert_eq!(after["weight"], 50.0, "{after}");
    assert_eq!(after["ai_enabled"], false, "{after}");
}

/// The admin API is on loopback unless the config says otherwise, and a config that puts it
/// beyond the host without a token is warned about (`breakwater check`, start-up log).
#[test]
fn the_admin_api_listens_on_loopback_by_default_and_an_open_one_without_a_token_is_warned_about() {
    use breakwater::config::Config;
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n";
    let routes = "[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstream = \"a\"\n";
    let cfg = Config::from_toml(&format!("{base}{routes}")).unwrap();
    assert_eq!(cfg.server.admin_listen, "127.0.0.1:9901".parse().unwrap());
    assert!(cfg.server.admin_listen.ip().is_loopback());
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());

    let open = format!("{base}admin_listen = \"0.0.0.0:9901\"\n");
    let warnings = Config::from_toml(&format!("{open}{routes}"))
        .unwrap()
        .warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.path == "server.admin_listen" && w.message.contains("admin_token_file")),
        "{warnings:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, RIGHT).unwrap();
    let guarded = format!("{open}admin_token_file = \"{}\"\n", token.display());
    let warnings = Config::from_toml(&format!("{guarded}{routes}"))
        .unwrap()
        .warnings();
    assert!(
        !warnings.iter().any(|w| w.path == "server.admin_listen"),
        "{warnings:?}"
    );
}

/// No secret breakwater holds shows in anything the admin listener serves without a token
/// (`/admin/config`, `/metrics`, inventory, breakers, DLQ, readiness), nor in its log: the
/// admin token, the HMAC key, AMQP passwords (DLQ and audit copy), and upstream credential
/// headers, whether inline, `{file = ...}` or `{env = ...}`. The AI does receive the
/// headers (so the secrets were loaded and are in use).
#[tokio::test]
async fn no_secret_shows_in_admin_config_metrics_or_the_log() {
    const TOKEN: &str = "admintok-S3CR3T-0a1b2c3d4e5f";
    const HMAC: &str = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7";
    const AMQP_PW: &str = "AmqpPw-S3CR3T-9f8e7d";
    const PUBLISH_PW: &str = "PublishPw-S3CR3T-6c5b4a";
    const INLINE: &str = "InlineVal-S3CR3T-1122";
    const FROM_FILE: &str = "FileVal-S3CR3T-3344";
    const FROM_ENV: &str = "EnvVal-S3CR3T-5566";
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let token_file = write("admin.token", &format!("{TOKEN}\n"));
    let key_file = write("audit.key", &format!("{HMAC}\n"));
    let header_file = write("ai.secret", &format!("{FROM_FILE}\n"));
    // Port 1: nothing listens, so the broker links keep failing (and keep retrying, the
    // moment where a careless log line would print the URL).
    let extra = format!(
        "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\npublish_url = \"amqp://bw:{PUBLISH_PW}@127.0.0.1:1/%2f\"\n\n[dlq]\namqp_url = \"amqp://bw:{AMQP_PW}@127.0.0.1:1/%2f\"\nspool_dir = \"{}\"\n",
        dir.path().join("decisions.jsonl").display(),
        key_file.display(),
        dir.path().join("spool").display()
    );
    let config = simple_config(&ai.url(), "replayable = true\n", &extra)
        .replace(
            "watch_config = true\n",
            &format!("admin_token_file = \"{}\"\n", token_file.display()),
        )
        .replace(
            &format!("url = \"{}\"\n", ai.url()),
            &format!(
                "url = \"{}\"\n[upstreams.ai.headers]\nx-api-key = \"{INLINE}\"\nx-file-key = {{ file = \"{}\" }}\nx-env-key = {{ env = \"BW_TEST_SECRET_HEADER\" }}\n",
                ai.url(),
                header_file.display()
            ),
        );
    let proxy = ProcessProxy::new(dir.path(), &config);
    let log = dir.path().join("breakwater.log");
    let mut cmd = std::process::Command::new(breakwater_bin());
    cmd.arg("--config")
        .arg(&proxy.config_path)
        .env("RUST_LOG", "debug")
        .env("BW_TEST_SECRET_HEADER", FROM_ENV)
        .stderr(std::fs::File::create(&log).unwrap());
    let _child = Reaped(Some(proxy.spawn_command(cmd).await));
    let admin = proxy.admin;

    // Traffic, a failure that goes to the DLQ, an admin change and a refused one.
    for path in ["/v1/a", "/v1/b"] {
        let r = http_client()
            .request(
                http::Request::get(proxy.url(path))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    ai.set_error_rate(1.0, 500);
    let r = http_client()
        .request(
            http::Request::post(proxy.url("/v1/c"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 502, "the AI's 500, no fallback");
    let (s, _) = call(
        admin,
        "POST",
        "/admin/routes/ai/ai",
        r#"{"enabled":true}"#,
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(admin, "POST", "/admin/reload", "", Some("Bearer nope")).await;
    assert_eq!(s, 401);
    let got = ai.received();
    let first = &got[0].headers;
    assert_eq!(first["x-api-key"], INLINE);
    assert_eq!(first["x-file-key"], FROM_FILE);
    assert_eq!(first["x-env-key"], FROM_ENV);
    // Let the broker links fail (and log) a few times.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut served = String::new();
    for path in [
        "/admin/config",
        "/metrics",
        "/admin/inventory",
        "/admin/inventory?format=table",
        "/admin/breakers",
        "/admin/dlq",
        "/readyz",
        "/healthz",
    ] {
        let (s, body) = call(admin, "GET", path, "", None).await;
        assert!(s == 200 || s == 503, "{path}: {s}");
        served.push_str(&format!("==> {path}\n{body}\n"));
    }
    // What a reader would use the config for is there, masked.
    assert!(
        served.contains("x-api-key") && served.contains("***"),
        "{served}"
    );
    assert!(served.contains("breakwater_requests_total"), "{served}");
    let logged = std::fs::read_to_string(&log).unwrap();
    // The broker links did fail and say so: the log had its chance to leak the URLs.
    assert!(
        logged.contains("RabbitMQ unreachable") && logged.contains("cannot reach RabbitMQ"),
        "no broker failure logged:\n{logged}"
    );
    for secret in [
        TOKEN,
        HMAC,
        AMQP_PW,
        PUBLISH_PW,
        INLINE,
        FROM_FILE,
        FROM_ENV,
        "Bearer nope",
    ] {
        assert!(!served.contains(secret), "{secret} is served:\n{served}");
        assert!(!logged.contains(secret), "{secret} is logged:\n{logged}");
    }
    // The key's first bytes are not served either (a prefix is no safer than the key).
    assert!(!served.contains(&HMAC[..16]));
}

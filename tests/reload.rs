//! Reloads that touch keys read once at start are refused by name, through the admin API
//! of a running proxy, and the old config keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::TestProxy;

/// One route "ai"; no file watcher, so only `POST /admin/reload` installs a new file.
fn config(timeout_ms: u64, replayable: bool, dlq: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nwatch_config = false\n\
         [upstreams.ai]\nurl = \"http://127.0.0.1:1\"\n\n[[routes]]\nname = \"ai\"\npath_prefix = \"/\"\n\
         upstream = \"ai\"\ntimeout_ms = {timeout_ms}\nreplayable = {replayable}\n{dlq}"
    )
}

fn dlq(dir: &std::path::Path, name: &str) -> String {
    format!("[dlq]\nspool_dir = \"{}\"\n", dir.join(name).display())
}

async fn generation(p: &TestProxy) -> u64 {
    p.admin_config().await["generation"].as_u64().unwrap()
}

fn rewrite(p: &TestProxy, text: &str) {
    std::fs::write(&p.config_path, text).unwrap();
}

/// Installs `text` by `POST /admin/reload` and checks it is refused with an error on `key`
/// that says a restart is needed, while the old generation keeps serving.
async fn assert_reload_refused(p: &TestProxy, text: &str, key: &str) {
    let gen0 = generation(p).await;
    rewrite(p, text);
    let r = p.admin_post("/admin/reload", "", None).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let errors = r.json()["error"]["errors"].clone();
    assert!(
        errors
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == key && e["message"].as_str().unwrap().contains("restart")),
        "{errors}"
    );
    assert_eq!(generation(p).await, gen0, "the old config keeps serving");
}

#[tokio::test]
async fn a_changed_spool_dir_is_refused_by_key_and_a_timeout_change_still_reloads() {
    let base = tempfile::tempdir().unwrap();
    let p = TestProxy::start(&config(2000, true, &dlq(base.path(), "a"))).await;
    let gen0 = generation(&p).await;

    let refused = config(2000, true, &dlq(base.path(), "b"));
    assert_reload_refused(&p, &refused, "dlq.spool_dir").await;

    rewrite(&p, &config(3000, true, &dlq(base.path(), "a")));
    let r = p.admin_post("/admin/reload", "", None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(generation(&p).await, gen0 + 1);
    let cfg = p.admin_config().await;
    assert!(cfg["config"].to_string().contains("3000"), "{cfg}");
    p.stop().await;
}

#[tokio::test]
async fn a_route_made_replayable_without_a_dlq_section_is_refused_by_route_key() {
    let p = TestProxy::start(&config(2000, false, "")).await;
    let refused = config(2000, true, "");
    assert_reload_refused(&p, &refused, "routes.ai.replayable").await;
    p.stop().await;
}

#[tokio::test]
async fn a_changed_audit_rotation_is_refused_by_key() {
    let base = tempfile::tempdir().unwrap();
    let key_file = base.path().join("key");
    std::fs::write(
        &key_file,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let audit = |rotate: u64| {
        format!(
            "[audit]\npath = \"{}\"\nhmac_key_file = \"{}\"\nrotate_bytes = {rotate}\n",
            base.path().join("decisions.jsonl").display(),
            key_file.display()
        )
    };
    let p = TestProxy::start(&config(2000, false, &audit(1_000_000))).await;
    let refused = config(2000, false, &audit(2_000_000));
    assert_reload_refused(&p, &refused, "audit.rotate_bytes").await;
    p.stop().await;
}

#[tokio::test]
async fn a_changed_amqp_url_list_is_refused_by_key() {
    let base = tempfile::tempdir().unwrap();
    // Unreachable nodes: the spool keeps what would be published; only the config matters.
    let nodes = |list: &str| format!("{}amqp_url = [{list}]\n", dlq(base.path(), "a"));
    let two = "\"amqp://guest:guest@127.0.0.1:1/%2f\", \"amqp://guest:guest@127.0.0.1:2/%2f\"";
    let p = TestProxy::start(&config(2000, true, &nodes(two))).await;
    let three = format!("{two}, \"amqp://guest:guest@127.0.0.1:3/%2f\"");
    assert_reload_refused(&p, &config(2000, true, &nodes(&three)), "dlq.amqp_url").await;
    p.stop().await;
}

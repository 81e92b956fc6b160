//! Every file in config/ is a valid config, and `breakwater check` reports every error
//! with its key path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;

#[test]
fn every_config_file_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // Relative paths in the examples are relative to the repository root.
            std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).unwrap();
            if let Err(e) = breakwater::config::Config::load(&path) {
                panic!("{} is invalid: {e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn check_command_accepts_the_example() {
    let out = Command::new(support::breakwater_bin())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "--config", "config/breakwater.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ok"));
}

#[test]
fn check_command_reports_every_error_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[server]
listen = "not-an-address"
admin_listen = "127.0.0.1:9901"

[upstreams.ai]
url = "ftp://example"

[[routes]]
name = "grading"
path_prefix = "v1/grading"
upstream = "missing"
[routes.breaker]
failure_rate = 1.5
[[routes.fallback]]
kind = "static"
"#
        .to_string()
            + &format!(
                "\n[audit]\npath = \"{0}/d.jsonl\"\nhmac_key_file = \"{0}/k\"\npublish_url = \"http://collector\"\n",
                dir.path().display()
            ),
    )
    .unwrap();
    std::fs::write(dir.path().join("k"), "00".repeat(32)).unwrap();
    let out = Command::new(support::breakwater_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "server.listen",
        "upstreams.ai.url",
        "routes[0].path_prefix",
        "routes[0].upstream",
        "routes[0].breaker.failure_rate",
        "routes[0].fallback[0]",
        "audit.publish_url",
    ] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }
}

#[test]
fn unknown_keys_are_errors_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("typo.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstreams.ai]\nurl = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"a\"\npath_prefix = \"/\"\nupstream = \"ai\"\n[routes.breaker]\nconsecutive_failure = 3\n",
    )
    .unwrap();
    let out = Command::new(support::breakwater_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routes[0].breaker"), "{err}");
    assert!(err.contains("consecutive_failure"), "{err}");
}

fn repo_root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A config on port 0 whose decision log uses the key file `key`.
fn config_with_audit_key(dir: &std::path::Path, key: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("bw.toml");
    let text = support::simple_config("http://127.0.0.1:9", "", "")
        + &format!(
            "\n[audit]\npath = \"{}/d.jsonl\"\nhmac_key_file = \"{}\"\n",
            dir.display(),
            key.display()
        );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_warns_loudly_when_the_example_audit_key_is_in_use() {
    let out = Command::new(support::breakwater_bin())
        .current_dir(repo_root())
        .args(["check", "--config", "config/breakwater.toml"])
        .env_remove("BREAKWATER_REFUSE_EXAMPLE_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("WARNING") && err.contains("audit.hmac_key_file"),
        "no warning about the public example key:\n{err}"
    );
    // A key of one's own draws no warning.
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("own.key");
    std::fs::write(&own, "5a".repeat(32)).unwrap();
    let out = Command::new(support::breakwater_bin())
        .args(["check", "--config"])
        .arg(config_with_audit_key(dir.path(), &own))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("WARNING"), "{err}");
}

#[test]
fn refuse_setting_makes_the_example_key_fatal_for_check_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with_audit_key(dir.path(), &repo_root().join("config/audit.example.key"));
    let out = Command::new(support::breakwater_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .env("BREAKWATER_REFUSE_EXAMPLE_KEY", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("example"), "{err}");
    // Starting refuses too, before binding anything.
    let mut child = Command::new(support::breakwater_bin())
        .arg("--config")
        .arg(&cfg)
        .env("BREAKWATER_REFUSE_EXAMPLE_KEY", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "breakwater started with the example key despite BREAKWATER_REFUSE_EXAMPLE_KEY=1"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("BREAKWATER_REFUSE_EXAMPLE_KEY"), "{err}");
}

#[tokio::test]
async fn upstream_headers_from_a_file_and_from_env_reach_the_ai_and_stay_masked() {
    let ai = support::MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("ai-token");
    // Secret files often end with a newline (echo, kubectl create secret --from-file).
    std::fs::write(&token, "Bearer file-secret-4711\n").unwrap();
    let var = format!("BW_TEST_AI_KEY_{}", std::process::id());
    std::env::set_var(&var, "env-secret-0815");
    let cfg = support::simple_config(&ai.url(), "", "").replace(
        &format!("url = \"{}\"", ai.url()),
        &format!(
            "url = \"{}\"\nheaders = {{ authorization = {{ file = \"{}\" }}, x-api-key = {{ env = \"{var}\" }}, x-plain = \"plain-secret\" }}",
            ai.url(),
            token.display()
        ),
    );
    let proxy = support::TestProxy::start(&cfg).await;
    assert_eq!(proxy.get("/x").await.status, 200);
    let seen = ai.received().last().unwrap().headers.clone();
    assert_eq!(seen["authorization"], "Bearer file-secret-4711");
    assert_eq!(seen["x-api-key"], "env-secret-0815");
    assert_eq!(seen["x-plain"], "plain-secret");
    let shown = proxy.admin_get("/admin/config").await.unwrap();
    let text = String::from_utf8_lossy(&shown.body);
    for secret in ["file-secret", "env-secret", "plain-secret"] {
        assert!(!text.contains(secret), "{secret} shown in {text}");
    }
    assert!(
        text.contains(&var),
        "the env source should be named: {text}"
    );
    proxy.stop().await;
    // A missing variable or file is a config error with its key path.
    let bad = cfg.replace(&var, "BW_TEST_SURELY_UNSET_VARIABLE");
    let err = breakwater::config::Config::from_toml(&bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("upstreams.ai.headers.x-api-key"), "{err}");
}

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

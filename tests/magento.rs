//! The Magento module (examples/magento) as a Magento developer would run it: `php -l` on
//! every file, its plain-PHP checks, and its integration test (examples/magento/tests/
//! integration.php) against a real breakwater, a real mock AI and the local RabbitMQ,
//! consumed with php-amqp. Needs Debian's php-cli, php-curl and php-amqp (.ci/run installs
//! them): skipped with a message when they are missing, unless CI=true.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::rabbit;
use support::*;

fn module_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/magento")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `php` (with the given extensions) is here; panics under CI=true when not.
fn php_with(extensions: &[&str]) -> bool {
    let modules = Command::new("php").arg("-m").output();
    let missing: Vec<&str> = match &modules {
        Err(_) => vec!["php"],
        Ok(o) => {
            let list = String::from_utf8_lossy(&o.stdout).to_ascii_lowercase();
            extensions
                .iter()
                .copied()
                .filter(|e| !list.lines().any(|l| l.trim() == *e))
                .collect()
        }
    };
    if missing.is_empty() {
        return true;
    }
    if in_ci() {
        panic!(
            "missing {missing:?} and CI=true (.ci/run installs php-cli php-curl php-amqp php-xml)"
        );
    }
    eprintln!("skipping: missing {missing:?} (apt-get install php-cli php-curl php-amqp php-xml)");
    false
}

fn php_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            php_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "php") {
            out.push(path);
        }
    }
}

fn report(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_php_file_of_the_module_lints_and_every_xml_file_parses() {
    if !php_with(&["dom"]) {
        return;
    }
    let mut files = Vec::new();
    php_files(&module_root(), &mut files);
    assert!(
        files.len() >= 15,
        "expected the module's PHP files, found {files:?}"
    );
    for f in &files {
        let out = Command::new("php").arg("-l").arg(f).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            report(&format!("php -l {}", f.display()), &out)
        );
    }
    let etc = module_root().join("Breakwater/AiBridge/etc");
    let mut xml = 0;
    for entry in std::fs::read_dir(&etc).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "xml") {
            xml += 1;
            let out = Command::new("php")
                .args(["-r", "exit((new DOMDocument())->load($argv[1]) ? 0 : 1);"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                report(&format!("{} is not well-formed", path.display()), &out)
            );
        }
    }
    assert!(xml >= 6, "expected the module's etc/*.xml, found {xml}");
}

/// Every replayable route of the example config has its topic (no wildcard), its consumer
/// on `breakwater.results.<route>` and its quorum binding; and nothing else has.
#[test]
fn the_module_has_a_topic_a_consumer_and_a_binding_per_replayable_route() {
    let cfg: toml::Value = toml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/breakwater.toml"),
        )
        .unwrap(),
    )
    .unwrap();
    let replayable: Vec<String> = cfg["routes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("replayable").and_then(|v| v.as_bool()) == Some(true))
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!replayable.is_empty());
    let etc = module_root().join("Breakwater/AiBridge/etc");
    let read = |f: &str| std::fs::read_to_string(etc.join(f)).unwrap();
    let (communication, consumers, topology) = (
        read("communication.xml"),
        read("queue_consumer.xml"),
        read("queue_topology.xml"),
    );
    for r in &replayable {
        assert!(communication.contains(&format!("<topic name=\"ai.result.{r}\" request=\"Breakwater\\AiBridge\\Api\\Data\\ReplayResultInterface\"/>")), "no topic for {r}");
        assert!(
            consumers.contains(&format!("queue=\"breakwater.results.{r}\"")),
            "no consumer for {r}"
        );
        assert!(
            topology.contains(&format!(
                "topic=\"ai.result.{r}\" destinationType=\"queue\""
            )),
            "no binding for {r}"
        );
        assert!(
            topology.contains(&format!("destination=\"breakwater.results.{r}\"")),
            "no queue for {r}"
        );
    }
    assert_eq!(communication.matches("<topic ").count(), replayable.len());
    assert_eq!(consumers.matches("<consumer ").count(), replayable.len());
    assert_eq!(topology.matches("<binding ").count(), replayable.len());
    assert_eq!(
        topology.matches("<argument ").count(),
        replayable.len(),
        "only x-queue-type: any other argument is refused by RabbitMQ"
    );
    assert!(
        !communication.contains('*') && !communication.contains('#'),
        "no wildcard topics"
    );
}

#[test]
fn the_module_plain_php_checks_pass() {
    if !php_with(&["curl", "json"]) {
        return;
    }
    let out = Command::new("php")
        .arg(module_root().join("tests/unit.php"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        report("php tests/unit.php", &out)
    );
}

const ROUTE_TIMEOUT_MS: u64 = 2000;

/// The dead-letter policy definition examples/magento/README.md gives for
/// `breakwater.results.*`; the test sets it on its own results queue only (shared broker).
const RESULTS_POLICY: &str =
    r#"{"dead-letter-exchange":"breakwater.results.dead","delivery-limit":20}"#;
const DEAD_EXCHANGE: &str = "breakwater.results.dead";

#[test]
fn the_module_readme_gives_the_policy_the_test_sets() {
    let readme = std::fs::read_to_string(module_root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("'^breakwater\\.results\\.' '{RESULTS_POLICY}'")),
        "README's rabbitmqctl set_policy differs from {RESULTS_POLICY}"
    );
}

/// `rabbitmqctl` with these arguments; false (or a panic under CI=true) when it cannot run.
fn rabbitmqctl(args: &[&str]) -> bool {
    let ok = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(!in_ci(), "rabbitmqctl {args:?} failed and CI=true");
        eprintln!("rabbitmqctl {args:?} failed: the dead-letter policy is not tested");
    }
    ok
}

/// A replayable route on /v1/grading (its breaker trips on the first failure and half-opens
/// after a second, so replays start soon after the AI recovers), a non-replayable one with a
/// static fallback, and one with no fallback; results go to the default `breakwater.results`,
/// the exchange the module's queue_topology.xml names.
fn config(ai: &MockAi, route: &str, dir: &Path) -> String {
    format!(
        "{server}
[upstreams.ai]
url = \"{ai}\"

[[routes]]
name = \"{route}\"
path_prefix = \"/v1/grading\"
upstream = \"ai\"
timeout_ms = {ROUTE_TIMEOUT_MS}
model_version_header = \"x-model-version\"
replayable = true
[routes.breaker]
consecutive_failures = 1
open_ms = 1000
open_max_ms = 2000
[[routes.fallback]]
kind = \"static\"
status = 202
body = '{{\"status\":\"queued\"}}'

[[routes]]
name = \"catalog\"
path_prefix = \"/v1/recommendations\"
upstream = \"ai\"
timeout_ms = {ROUTE_TIMEOUT_MS}
model_version_header = \"x-model-version\"
[[routes.fallback]]
kind = \"static\"
status = 200
body = '{{\"items\":[]}}'

[[routes]]
name = \"pricing\"
path_prefix = \"/v1/pricing\"
upstream = \"ai\"
timeout_ms = {ROUTE_TIMEOUT_MS}

[dlq]
amqp_url = \"{amqp}\"
spool_dir = \"{spool}\"
replay_rate_per_s = 50
queued_wait_ms = 2000
",
        server = server_section(),
        ai = ai.url(),
        amqp = rabbit::URL,
        spool = dir.join("spool").display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_magento_module_calls_breakwater_and_applies_each_replayed_answer_once() {
    if !php_with(&["curl", "json", "amqp", "dom"]) || !rabbit::available().await {
        return;
    }
    let ai = MockAi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let route = rabbit::unique_route("magento_grading");
    let proxy = TestProxy::start(&config(&ai, &route, dir.path())).await;
    // The README's dead-letter policy, on this test's results queue only, and a queue on
    // its dead-letter exchange.
    let (_conn, ch) = rabbit::channel().await;
    let policy = format!("magento-test-{route}");
    let dead_queue = format!("breakwater.results-dead.{route}");
    rabbit::bound_queue(
        &ch,
        DEAD_EXCHANGE,
        &dead_queue,
        &format!("ai.result.{route}"),
    )
    .await;
    let pattern = format!("^breakwater\\.results\\.{route}$");
    let policy_set = rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "100",
        &policy,
        &pattern,
        RESULTS_POLICY,
    ]);
    let state = dir.path().join("php");
    std::fs::create_dir_all(&state).unwrap();

    let mut cmd = Command::new("php");
    cmd.arg(module_root().join("tests/integration.php"))
        .env("BW_URL", format!("http://{}", proxy.addr))
        .env("BW_ADMIN_URL", format!("http://{}", proxy.admin))
        .env("MOCK_AI_URL", ai.url())
        .env("BW_ROUTE", &route)
        .env("BW_ROUTE_TIMEOUT_MS", ROUTE_TIMEOUT_MS.to_string())
        .env("BW_STATE_DIR", &state)
        .env("AMQP_HOST", "127.0.0.1")
        .env("AMQP_PORT", "5672")
        .env("AMQP_USER", "guest")
        .env("AMQP_PASSWORD", "guest")
        .env("AMQP_VHOST", "/");
    if policy_set {
        cmd.env("BW_DEAD_QUEUE", &dead_queue);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();

    // Our own queues and policy only: the broker is shared. breakwater first, or its
    // replay worker declares the route's queues again.
    proxy.stop().await;
    if policy_set {
        rabbitmqctl(&["clear_policy", &policy]);
    }
    for q in [
        dead_queue.clone(),
        format!("breakwater.dlq.{route}"),
        format!("breakwater.dlq.{route}.parked"),
        format!("breakwater.results.{route}"),
    ] {
        let _ = ch
            .queue_delete(
                q.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    assert!(
        out.status.success(),
        "{}",
        report("php tests/integration.php", &out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        stdout.contains("each answer applied exactly once") && stdout.contains("integration: "),
        "{stdout}"
    );
}

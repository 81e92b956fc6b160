//! The Kubernetes manifests (config/kubernetes/) as an operator's tools see them: rendered
//! by `kubectl kustomize`, validated by PyPI's `kubernetes-validate` against the 1.29
//! schemas, and held to breakwater's policy (policy.py) by `validate.sh`. A manifest
//! mutated the way a well-meant edit breaks it must fail with a message that says why.
//! Skipped when the tools are missing, unless CI=true (then missing tools are a failure).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether kubectl, kubernetes-validate and python3 with PyYAML and jsonschema are here.
fn tools_present() -> bool {
    let runs = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ok = runs("kubectl", &["version", "--client"])
        && runs("kubernetes-validate", &["--version"])
        && runs("python3", &["-c", "import yaml, jsonschema, tomllib"]);
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "CI=true but kubectl, kubernetes-validate or python3 (yaml, jsonschema) is \
                 missing: .ci/run installs them"
            );
        }
        eprintln!("skipped: kubectl / kubernetes-validate / python3 yaml+jsonschema missing");
    }
    ok
}

/// Runs validate.sh on `dir` (a copy of config/kubernetes); (success, stdout + stderr).
fn validate(dir: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(repo().join("config/kubernetes/validate.sh"))
        .arg(dir)
        .output()
        .expect("cannot run validate.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A copy of config/ (validate.sh reads ../breakwater.toml beside the manifests).
fn copy_of_config() -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    copy(&repo().join("config"), &tmp.path().join("config"));
    let k8s = tmp.path().join("config/kubernetes");
    (tmp, k8s)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_manifests_render_validate_against_kubernetes_1_29_and_pass_the_policy() {
    if !tools_present() {
        return;
    }
    let (ok, out) = validate(&repo().join("config/kubernetes"));
    assert!(ok, "validate.sh failed:\n{out}");
    // Both the kustomize overlay and the plain example were checked.
    assert_eq!(out.matches(": ok (1 deployment(s)").count(), 2, "{out}");
}

#[test]
fn a_subpath_an_emptydir_a_short_grace_or_no_native_sidecar_fails_validation_and_says_why() {
    if !tools_present() {
        return;
    }
    let patch = "sidecar/sidecar-patch.yaml";
    let example = "example/breakwater-sidecar.yaml";
    let ephemeral = "          ephemeral:\n            volumeClaimTemplate:\n              spec:\n";
    // (file, from, to, what the failure must say)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            patch,
            "              mountPath: /app/config\n",
            "              mountPath: /app/config/breakwater.toml\n              subPath: breakwater.toml\n",
            "uses subPath: a subPath mount is never updated",
        ),
        (
            patch,
            "terminationGracePeriodSeconds: 45",
            "terminationGracePeriodSeconds: 10",
            "terminationGracePeriodSeconds (10) must be above server.shutdown_grace_ms (15000 ms)",
        ),
        (
            patch,
            "          restartPolicy: Always\n",
            "",
            "restartPolicy must be Always (a native sidecar)",
        ),
        (
            example,
            "            runAsUser: 65532\n",
            "",
            "runAsUser must be the numeric user 65532",
        ),
        (
            patch,
            "              path: /healthz\n",
            "              path: /readyz\n",
            "livenessProbe must GET /healthz",
        ),
        (
            "magento/secret.example.yaml",
            "  audit.key: REPLACE_ME\n",
            "  audit.key: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
            "key 'audit.key' holds a literal value",
        ),
    ];
    for (file, from, to, says) in cases {
        let (_tmp, dir) = copy_of_config();
        edit(&dir.join(file), from, to);
        let (ok, out) = validate(&dir);
        assert!(!ok, "{file}: {to:?} passed validation:\n{out}");
        assert!(out.contains(says), "{file}: expected {says:?} in:\n{out}");
    }

    // An emptyDir for /app/var: schema-valid, refused by the policy.
    let (_tmp, dir) = copy_of_config();
    let path = dir.join(example);
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find(ephemeral)
        .expect("the example's ephemeral volume");
    let end = start + text[start..].find("storage: 4Gi\n").unwrap() + "storage: 4Gi\n".len();
    let mutated = format!(
        "{}          emptyDir: {{}}\n{}",
        &text[..start],
        &text[end..]
    );
    std::fs::write(&path, mutated).unwrap();
    let (ok, out) = validate(&dir);
    assert!(!ok, "an emptyDir /app/var passed validation:\n{out}");
    assert!(
        out.contains(
            "/app/var is an emptyDir: it is deleted with the pod and loses an undrained DLQ spool"
        ),
        "{out}"
    );

    // A field Kubernetes 1.29 does not know: the schema check refuses it.
    let (_tmp, dir) = copy_of_config();
    edit(
        &dir.join(patch),
        "          restartPolicy: Always\n",
        "          restartPolicy: Always\n          restartPolicyy: Always\n",
    );
    let (ok, out) = validate(&dir);
    assert!(!ok, "an unknown field passed validation:\n{out}");
    assert!(
        out.contains("'restartPolicyy' was unexpected") && out.contains("schema validation failed"),
        "{out}"
    );
}

/// The ConfigMap's breakwater.toml is a config breakwater accepts, once its Secret files and
/// env var exist (here: temp files standing in for the Secret mount).
#[test]
fn the_sidecar_config_in_the_configmap_is_a_valid_breakwater_config() {
    let text =
        std::fs::read_to_string(repo().join("config/kubernetes/sidecar/breakwater.toml")).unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let files = [
        (
            "audit.key",
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        ),
        ("admin-token", "an-admin-token-of-32-characters!"),
        ("recommender-authorization", "Bearer test"),
        ("grader-authorization", "Bearer test"),
    ];
    for (name, value) in files {
        std::fs::write(secrets.path().join(name), value).unwrap();
    }
    let grader = secrets.path().join("grader-authorization");
    let text = text
        .replace("/app/secrets", &secrets.path().display().to_string())
        .replace(
            "{ env = \"BREAKWATER_GRADER_AUTHORIZATION\" }",
            &format!("{{ file = \"{}\" }}", grader.display()),
        );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("breakwater.toml");
    std::fs::write(&path, text).unwrap();
    let cfg = breakwater::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.server.admin_listen.port(), 9901);
    assert_eq!(
        cfg.server.readiness,
        breakwater::config::ReadinessMode::Traffic
    );
    assert!(cfg.server.admin_token.is_some());
}

/// Every base image in the Dockerfile is pinned by digest, so a rebuild pulls the bytes that
/// were reviewed (a tag can be moved under the same name). `FROM <earlier stage>` is exempt.
#[test]
fn the_dockerfile_pins_every_base_image_by_digest() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut stages: Vec<String> = Vec::new();
    let mut bases = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words
            .first()
            .is_none_or(|w| !w.eq_ignore_ascii_case("FROM"))
        {
            continue;
        }
        let image = words
            .iter()
            .skip(1)
            .find(|w| !w.starts_with("--"))
            .expect("FROM names an image");
        let earlier_stage = stages.contains(&image.to_lowercase());
        if let Some(i) = words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
            stages.push(words[i + 1].to_lowercase());
        }
        if earlier_stage {
            continue;
        }
        bases += 1;
        let digest = image
            .split_once("@sha256:")
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("{line}: the base image is not pinned by digest"));
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "{line}: a sha256 digest is 64 hex digits"
        );
        assert!(
            image.find(':') < image.find('@'),
            "{line}: keep the tag beside the digest so readers know what it is"
        );
    }
    assert_eq!(bases, 2, "the build and the runtime stage");
}

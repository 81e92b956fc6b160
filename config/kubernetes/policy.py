#!/usr/bin/env python3
"""Policy check for breakwater's Kubernetes manifests (run by validate.sh).

Schema validation (kubernetes-validate) says a manifest is well formed; this says it runs
breakwater the way the README promises: a native sidecar, config and secrets mounted as
whole directories, /app/var not on an emptyDir, probes on the admin port, a grace period
above shutdown_grace_ms, a locked-down securityContext, CPU 1, a PodMonitor for /metrics,
and no literal secret anywhere.

Usage: policy.py [--repo-config config/breakwater.toml] MANIFEST.yaml...
Exit 0 when every manifest passes, 1 with one line per violation otherwise.
"""

import argparse
import base64
import re
import sys
import tomllib

import jsonschema
import yaml

SIDECAR = "breakwater"
USER = 65532
PLACEHOLDER = re.compile(r"^(REPLACE_ME[A-Za-z0-9_-]*|<[^<>]+>)?$")
SECRETISH_ENV = re.compile(r"(AUTH|TOKEN|KEY|PASSWORD|SECRET|AMQP_URL)", re.I)

# Just enough of monitoring.coreos.com/v1 PodMonitor to catch a typo that would make
# Prometheus scrape nothing (kubernetes-validate has no schema for CRDs).
PODMONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer"},
                            "targetPort": {},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


class Checker:
    def __init__(self, source):
        self.source = source
        self.errors = []

    def fail(self, where, message):
        self.errors.append(f"policy: {self.source}: {where}: {message}")

    def check(self, ok, where, message):
        if not ok:
            self.fail(where, message)
        return ok


def port_of(listen):
    return int(str(listen).rsplit(":", 1)[1])


def breakwater_config(docs, checker):
    """The TOML breakwater runs with: the breakwater.toml key of the ConfigMap it mounts."""
    for d in docs:
        if d.get("kind") == "ConfigMap" and "breakwater.toml" in (d.get("data") or {}):
            name = d["metadata"]["name"]
            try:
                return name, tomllib.loads(d["data"]["breakwater.toml"])
            except tomllib.TOMLDecodeError as e:
                checker.fail(f"configmap/{name}", f"breakwater.toml is not TOML: {e}")
                return name, None
    checker.fail("manifest", "no ConfigMap with a breakwater.toml key")
    return None, None


def check_config_secrets(cfg, secret_dirs, checker):
    """Secrets in the config are files under a Secret mount or env vars, never literals."""
    where = "breakwater.toml"
    server = cfg.get("server", {})
    audit = cfg.get("audit", {})
    for key, path in (
        ("server.admin_token_file", server.get("admin_token_file")),
        ("audit.hmac_key_file", audit.get("hmac_key_file")),
    ):
        if path is None:
            continue
        checker.check(
            any(str(path).startswith(d.rstrip("/") + "/") for d in secret_dirs),
            where,
            f"{key} = {path!r} is not under a Secret mount ({', '.join(secret_dirs) or 'none'})",
        )
    for name, up in (cfg.get("upstreams") or {}).items():
        for header, value in (up.get("headers") or {}).items():
            checker.check(
                isinstance(value, dict) and ("file" in value or "env" in value),
                where,
                f"upstreams.{name}.headers.{header} is a literal value: use "
                "{ file = ... } on the Secret mount or { env = ... } from a secretKeyRef",
            )
    for key in ("amqp_url", "publish_url"):
        section = cfg.get("dlq" if key == "amqp_url" else "audit", {})
        urls = section.get(key)
        urls = urls if isinstance(urls, list) else [urls] if urls else []
        for url in urls:
            checker.check(
                not re.search(r"//[^/@]*:[^/@]+@", str(url)),
                where,
                f"{key} carries a password: leave it out and set $BREAKWATER_AMQP_URL from the Secret",
            )


def check_secret_resources(docs, checker):
    for d in docs:
        if d.get("kind") != "Secret":
            continue
        name = d["metadata"]["name"]
        values = dict(d.get("stringData") or {})
        for k, v in (d.get("data") or {}).items():
            try:
                values[k] = base64.b64decode(v).decode("utf-8", "replace")
            except ValueError:
                values[k] = v
        for k, v in values.items():
            checker.check(
                PLACEHOLDER.match(str(v).strip()) is not None,
                f"secret/{name}",
                f"key {k!r} holds a literal value: only placeholders (REPLACE_ME) belong in git",
            )


def container_ports(c):
    return {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}


def probe_port(probe, c):
    port = (probe.get("httpGet") or {}).get("port")
    if isinstance(port, str) and not port.isdigit():
        return container_ports(c).get(port)
    return int(port) if port is not None else None


def check_deployment(d, cfg, docs, repo_grace_ms, checker):
    name = f"deployment/{d['metadata']['name']}"
    pod = d["spec"]["template"]["spec"]
    labels = d["spec"]["template"].get("metadata", {}).get("labels", {})
    main = [c for c in pod.get("containers") or [] if c.get("name") == SIDECAR]
    init = [c for c in pod.get("initContainers") or [] if c.get("name") == SIDECAR]
    if not init:
        checker.check(
            not main,
            name,
            "breakwater is a regular container: make it a native sidecar "
            "(an initContainers entry with restartPolicy: Always, Kubernetes 1.29+)",
        )
        return False
    c = init[0]
    where = f"{name}: initContainers[{SIDECAR}]"
    checker.check(
        c.get("restartPolicy") == "Always",
        where,
        "restartPolicy must be Always (a native sidecar); without it Magento never starts",
    )

    # securityContext: the container's, falling back to the pod's where Kubernetes does.
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    eff = lambda k: sc.get(k, psc.get(k))  # noqa: E731
    checker.check(eff("runAsNonRoot") is True, where, "securityContext.runAsNonRoot must be true")
    user = eff("runAsUser")
    checker.check(
        isinstance(user, int) and user == USER,
        where,
        f"securityContext.runAsUser must be the numeric user {USER} "
        f"(runAsNonRoot cannot verify a named user), got {user!r}",
    )
    checker.check(
        sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem must be true"
    )
    checker.check(
        sc.get("allowPrivilegeEscalation") is False,
        where,
        "allowPrivilegeEscalation must be false",
    )
    checker.check(
        "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
        where,
        "capabilities.drop must contain ALL",
    )
    checker.check(
        (eff("seccompProfile") or {}).get("type") == "RuntimeDefault",
        where,
        "seccompProfile.type must be RuntimeDefault",
    )

    # Probes on the admin port of the config breakwater runs.
    admin_port = None
    if cfg is not None:
        admin_port = port_of(cfg.get("server", {}).get("admin_listen", "127.0.0.1:9901"))
        host = str(cfg.get("server", {}).get("admin_listen", "127.0.0.1:9901")).rsplit(":", 1)[0]
        checker.check(
            host not in ("127.0.0.1", "localhost", "[::1]"),
            where,
            f"server.admin_listen is loopback ({host}): the kubelet probes the pod IP, "
            "so every probe would fail",
        )
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        p = c.get(probe)
        if not checker.check(p is not None, where, f"{probe} is missing (httpGet {path})"):
            continue
        got = (p.get("httpGet") or {}).get("path")
        checker.check(got == path, where, f"{probe} must GET {path}, got {got!r}")
        port = probe_port(p, c)
        checker.check(
            admin_port is None or port == admin_port,
            where,
            f"{probe} port {port!r} is not the admin port {admin_port} (server.admin_listen)",
        )

    # terminationGracePeriodSeconds above shutdown_grace_ms.
    grace_ms = 15000
    if cfg is not None:
        grace_ms = cfg.get("server", {}).get("shutdown_grace_ms", 15000)
    need = max(grace_ms, repo_grace_ms or 0)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    checker.check(
        tgps * 1000 > need,
        name,
        f"terminationGracePeriodSeconds ({tgps}) must be above server.shutdown_grace_ms "
        f"({need} ms), or the kubelet kills breakwater mid-drain",
    )

    # CPU 1 as the sidecar budget.
    res = c.get("resources") or {}
    for kind in ("requests", "limits"):
        cpu = str((res.get(kind) or {}).get("cpu", ""))
        checker.check(
            cpu in ("1", "1000m"), where, f"resources.{kind}.cpu must be 1 (the sidecar budget), got {cpu!r}"
        )

    # Volumes.
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
    for m in c.get("volumeMounts") or []:
        v = volumes.get(m["name"], {})
        if "configMap" in v or "secret" in v or "projected" in v:
            checker.check(
                "subPath" not in m and "subPathExpr" not in m,
                where,
                f"volumeMount {m['mountPath']} uses subPath: a subPath mount is never updated, "
                "so config edits (hot reload) and rotated secrets would never arrive",
            )
    cm = mounts.get("/app/config")
    if checker.check(cm is not None, where, "no volumeMount at /app/config (the config directory)"):
        v = volumes.get(cm["name"], {})
        checker.check(
            "configMap" in v or "projected" in v,
            where,
            "/app/config must come from a ConfigMap",
        )
    var = mounts.get("/app/var")
    if checker.check(var is not None, where, "no volumeMount at /app/var (decision log, DLQ spool)"):
        v = volumes.get(var["name"], {})
        checker.check(
            "emptyDir" not in v,
            where,
            "/app/var is an emptyDir: it is deleted with the pod and loses an undrained DLQ "
            "spool; use a generic ephemeral volume or a PersistentVolumeClaim",
        )
        checker.check(
            "ephemeral" in v or "persistentVolumeClaim" in v,
            where,
            "/app/var must be a generic ephemeral volume or a PersistentVolumeClaim",
        )
    secret_dirs = [
        path
        for path, m in mounts.items()
        if "secret" in volumes.get(m["name"], {})
        or any("secret" in s for s in (volumes.get(m["name"], {}).get("projected") or {}).get("sources", []))
    ]
    checker.check(bool(secret_dirs), where, "no Secret volume mounted (HMAC key, admin token)")
    if cfg is not None:
        check_config_secrets(cfg, secret_dirs, checker)
    for e in c.get("env") or []:
        if "value" in e and SECRETISH_ENV.search(e["name"]):
            checker.fail(where, f"env {e['name']} has a literal value: use valueFrom.secretKeyRef")

    # A PodMonitor that selects this pod and scrapes /metrics on the admin port.
    monitors = [x for x in docs if x.get("kind") == "PodMonitor"]
    found = False
    for pm in monitors:
        try:
            jsonschema.validate(pm, PODMONITOR_SCHEMA)
        except jsonschema.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            checker.fail(f"podmonitor/{pm.get('metadata', {}).get('name')}", f"{path}: {e.message}")
            continue
        sel = pm["spec"]["selector"].get("matchLabels", {})
        if not all(labels.get(k) == v for k, v in sel.items()):
            continue
        for ep in pm["spec"]["podMetricsEndpoints"]:
            port = ep.get("portNumber") or container_ports(c).get(ep.get("port"))
            if ep.get("path", "/metrics") == "/metrics" and (admin_port is None or port == admin_port):
                found = True
    checker.check(
        found,
        name,
        "no PodMonitor selects this pod's labels and scrapes /metrics on the admin port",
    )
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo-config", help="config/breakwater.toml, for its shutdown_grace_ms")
    ap.add_argument("manifests", nargs="+")
    args = ap.parse_args()
    repo_grace = None
    if args.repo_config:
        with open(args.repo_config, "rb") as f:
            repo_grace = tomllib.load(f).get("server", {}).get("shutdown_grace_ms", 15000)
    errors = []
    for path in args.manifests:
        checker = Checker(path)
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        _, cfg = breakwater_config(docs, checker)
        check_secret_resources(docs, checker)
        sidecars = 0
        for d in docs:
            if d.get("kind") == "Deployment":
                sidecars += check_deployment(d, cfg, docs, repo_grace, checker)
        checker.check(sidecars > 0, "manifest", "no Deployment runs breakwater as a native sidecar")
        errors += checker.errors
        if not checker.errors:
            print(f"policy: {path}: ok ({sidecars} deployment(s) with the breakwater sidecar)")
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Validates breakwater's Kubernetes manifests the way CI does:
#   1. renders the magento overlay (which uses the sidecar component) with `kubectl kustomize`,
#   2. validates it and the plain example against the Kubernetes 1.29 schemas with
#      PyPI's kubernetes-validate (--strict: unknown fields are errors); the PodMonitor CRD
#      has no schema there and is checked by policy.py against a small schema of its own,
#   3. checks breakwater's policy (policy.py): native sidecar, no subPath for config or
#      secrets, no emptyDir for /app/var, probes on the admin port, grace above
#      shutdown_grace_ms, numeric non-root user and a locked-down securityContext, CPU 1,
#      a PodMonitor, placeholders only in Secrets.
# Usage: config/kubernetes/validate.sh [DIR]   (DIR: a copy of config/kubernetes; default: here)
# Needs: kubectl (with kustomize), kubernetes-validate, python3 with PyYAML and jsonschema.
set -euo pipefail
here="$(cd "${1:-$(dirname "$0")}" && pwd)"
k8s_version=1.29.0

for tool in kubectl kubernetes-validate python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "validate.sh: $tool is not installed" >&2; exit 2; }
done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "== kubectl kustomize $here/magento"
kubectl kustomize "$here/magento" >"$out/magento.yaml"
manifests=("$out/magento.yaml" "$here/example/breakwater-sidecar.yaml")

echo "== kubernetes-validate --strict -k $k8s_version"
# kubernetes-validate prints "ERROR ..." per invalid resource and exits non-zero; a CRD
# without a schema is only a warning (policy.py checks the PodMonitor).
if ! kubernetes-validate --strict -k "$k8s_version" --quiet "${manifests[@]}" 2>&1 | tee "$out/schema.log"; then
  echo "validate.sh: schema validation failed (see above)" >&2
  exit 1
fi
if grep -q '^ERROR' "$out/schema.log"; then
  echo "validate.sh: schema validation failed (see above)" >&2
  exit 1
fi

echo "== policy"
repo_config=()
[ -f "$here/../breakwater.toml" ] && repo_config=(--repo-config "$here/../breakwater.toml")
python3 "$here/policy.py" "${repo_config[@]}" "${manifests[@]}"
echo "validate.sh: ok"

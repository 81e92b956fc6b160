#!/usr/bin/env bash
# Builds the container image without a Docker daemon and runs it, on demand (not in CI: the
# release build alone takes ~15 minutes on 2 cores).
#
# No image registry is reachable here, so the Dockerfile's two FROM lines are stood in for:
#   - build stage (rust:*-bookworm): the release binary is built on this Debian 12 host;
#   - runtime (gcr.io/distroless/cc-debian12:nonroot): a root filesystem made by mmdebstrap
#     from Debian's mirror with what distroless/cc holds (libc6, libgcc-s1; extracted, no
#     shell, no package manager) plus /etc/passwd and /etc/group naming 65532 `nonroot`.
# The image is then assembled with `buildah from scratch` the way the Dockerfile does
# (WORKDIR /app, /app/config, /app/var owned by 65532 and 0700, ENV, USER 65532:65532,
# ENTRYPOINT), run with runc on a read-only root filesystem with no capabilities and
# no_new_privs, and checked: the uid, `breakwater check` inside, /healthz, /readyz and one
# request proxied to a mock AI on loopback.
#
# Usage: loadtests/image-test.sh          (as root; installs buildah, runc, mmdebstrap if missing)
# Leaves the image as localhost/breakwater:image-test in buildah's storage.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

log() { printf '\n== %s ==\n' "$*"; }
fail() { echo "image-test: FAIL: $*" >&2; exit 1; }

need=()
for tool in buildah runc mmdebstrap; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" uidmap
fi
# Inside a container: no overlay mounts and no nested namespaces for RUN steps.
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"

work="$(mktemp -d /tmp/breakwater-image-test.XXXXXX)"
name="breakwater-image-test-$$"
image="localhost/breakwater:image-test"
ctr=""
mock_pid=""
cleanup() {
  set +e
  runc kill "$name" KILL >/dev/null 2>&1
  runc delete -f "$name" >/dev/null 2>&1
  [ -n "$mock_pid" ] && kill "$mock_pid" 2>/dev/null
  if [ -n "$ctr" ]; then buildah umount "$ctr" >/dev/null 2>&1; buildah rm "$ctr" >/dev/null 2>&1; fi
  rm -rf "$work"
}
trap cleanup EXIT

log "release binary (the Dockerfile's build stage)"
started=$(date +%s)
cargo build --release --locked --bin breakwater
cargo build -p loadtests --bin mock-ai
echo "built in $(( $(date +%s) - started )) s"

log "runtime root filesystem: mmdebstrap bookworm (standing in for distroless/cc-debian12)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mmdebstrap --quiet --variant=extract --include=libc6,libgcc-s1 \
  --dpkgopt='path-exclude=/usr/share/{doc,man,locale,info}/*' \
  bookworm "$work/rootfs.tar" "$mirror"
mkdir -p "$work/rootfs"
tar -C "$work/rootfs" -xf "$work/rootfs.tar"
# What distroless's base adds: the nonroot user, a /tmp, an empty /etc/os-release stand-in.
mkdir -p "$work/rootfs/etc" "$work/rootfs/tmp"
chmod 1777 "$work/rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$work/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$work/rootfs/etc/group"
# The binary finds its libraries in the root filesystem, not on this host.
ldd target/release/breakwater | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
  [ -e "$work/rootfs$lib" ] || [ -e "$work/rootfs/usr$lib" ] || fail "$lib is not in the runtime root filesystem"
done

log "buildah from scratch (the Dockerfile's runtime stage)"
ctr="$(buildah from scratch)"
buildah copy --quiet "$ctr" "$work/rootfs/" /
buildah copy --quiet --chmod 0755 "$ctr" target/release/breakwater /usr/local/bin/breakwater
buildah copy --quiet "$ctr" config /app/config
mkdir -p "$work/var/audit" "$work/var/spool"
chmod 0700 "$work/var" "$work/var/audit" "$work/var/spool"
buildah copy --quiet --chown 65532:65532 "$ctr" "$work/var" /app/var
buildah config \
  --workingdir /app \
  --env BREAKWATER_CONFIG=/app/config/breakwater.toml \
  --env BREAKWATER_REFUSE_EXAMPLE_KEY=1 \
  --user 65532:65532 \
  --port 8080 --port 9901 \
  --entrypoint '["/usr/local/bin/breakwater"]' \
  --cmd '' \
  "$ctr"
buildah commit --quiet "$ctr" "$image" >/dev/null
buildah umount "$ctr" >/dev/null 2>&1 || true
buildah rm "$ctr" >/dev/null
ctr=""

log "image config"
# The JSON of `buildah inspect`, read with python (no Go template to get wrong).
buildah inspect --type image "$image" >"$work/inspect.json"
python3 - "$work/inspect.json" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))["OCIv1"]["config"]
print("User:", cfg.get("User"), " WorkingDir:", cfg.get("WorkingDir"), " Entrypoint:", cfg.get("Entrypoint"))
assert cfg.get("User") == "65532:65532", cfg.get("User")
assert cfg.get("WorkingDir") == "/app", cfg.get("WorkingDir")
assert cfg.get("Entrypoint") == ["/usr/local/bin/breakwater"], cfg.get("Entrypoint")
EOF

log "OCI bundle from the image, read-only root, no capabilities"
ctr="$(buildah from "$image")"
mnt="$(buildah mount "$ctr")"
bundle="$work/bundle"
mkdir -p "$bundle" "$work/run-config" "$work/run-var"
# A config of our own (the shipped one carries the public example key, which the image
# refuses), on loopback ports; the container shares this host's network namespace.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/run-config/audit.key"
cp config/fallbacks/popular.json "$work/run-config/popular.json"
cat >"$work/run-config/breakwater.toml" <<EOF
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19901"
shutdown_grace_ms = 2000

[upstreams.recommender]
url = "http://127.0.0.1:19000"
connect_timeout_ms = 250

[[routes]]
name = "recommendations"
path_prefix = "/v1/recommendations"
upstream = "recommender"
timeout_ms = 800
model_version_header = "x-model-version"
[[routes.fallback]]
kind = "static"
status = 200
body_file = "config/popular.json"
content_type = "application/json"

[audit]
path = "var/audit/decisions.jsonl"
hmac_key_file = "/app/config/audit.key"

[dlq]
spool_dir = "var/spool"
EOF
chmod -R a+rX "$work/run-config"
chown 65532:65532 "$work/run-var"
chmod 0700 "$work/run-var"
(cd "$bundle" && runc spec)
python3 - "$bundle/config.json" "$mnt" "$work" <<'EOF'
import json, sys
path, rootfs, work = sys.argv[1:]
spec = json.load(open(path))
spec["root"] = {"path": rootfs, "readonly": True}
p = spec["process"]
p["terminal"] = False
p["user"] = {"uid": 65532, "gid": 65532}
p["cwd"] = "/app"
p["args"] = ["/usr/local/bin/breakwater", "--config", "/app/config/breakwater.toml"]
p["env"] = ["PATH=/usr/local/bin:/usr/bin:/bin", "BREAKWATER_REFUSE_EXAMPLE_KEY=1", "HOSTNAME=image-test"]
p["noNewPrivileges"] = True
p["capabilities"] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
# The host's network namespace: the mock and curl reach it on loopback.
spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
spec["mounts"] += [
    {"destination": "/app/config", "type": "bind", "source": f"{work}/run-config", "options": ["rbind", "ro"]},
    {"destination": "/app/var", "type": "bind", "source": f"{work}/run-var", "options": ["rbind", "rw"]},
]
json.dump(spec, open(path, "w"), indent=1)
EOF

log "mock AI on 127.0.0.1:19000"
target/debug/mock-ai --listen 127.0.0.1:19000 >"$work/mock.log" 2>&1 &
mock_pid=$!

log "runc run (read-only root filesystem, uid 65532)"
runc run --bundle "$bundle" "$name" >"$work/breakwater.log" 2>&1 &
ok=""
for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:19901/readyz >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.1
done
[ -n "$ok" ] || { cat "$work/breakwater.log" >&2; fail "breakwater never became ready"; }

pid="$(runc state "$name" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')"
uids="$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")"
echo "uid (real effective saved fs): $uids"
[ "$uids" = "65532 65532 65532 65532" ] || fail "breakwater runs as $uids, not 65532"
caps="$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")"
echo "effective capabilities: $caps"
[ "$caps" = "0000000000000000" ] || fail "breakwater has capabilities $caps"

echo "breakwater check inside the container:"
runc exec --user 65532:65532 --cwd /app "$name" /usr/local/bin/breakwater check --config /app/config/breakwater.toml \
  || fail "breakwater check failed inside the image"
# The root filesystem is mounted read-only in the container's mount namespace (the mount
# options of "/" as the process sees them; the image has no shell to try a write with).
root_opts="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | tail -1)"
echo "root filesystem mount options: $root_opts"
case ",$root_opts," in *,ro,*) ;; *) fail "the root filesystem is not read-only ($root_opts)" ;; esac

health="$(curl -fsS http://127.0.0.1:19901/healthz)"
echo "/healthz: $health"
ready="$(curl -sS -w ' %{http_code}' http://127.0.0.1:19901/readyz)"
echo "/readyz: $ready"
case "$ready" in *'"ready":true'*' 200') ;; *) fail "/readyz: $ready" ;; esac
answer="$(curl -sS -D "$work/headers" http://127.0.0.1:18080/v1/recommendations?user=1)"
outcome="$(awk 'tolower($1) == "x-breakwater-outcome:" {print $2}' "$work/headers" | tr -d '\r')"
echo "proxied: outcome=$outcome body=${answer:0:120}"
[ "$outcome" = "ai" ] || fail "the proxied request was not answered by the AI (outcome $outcome)"
[ -s "$work/run-var/audit/decisions.jsonl" ] || sleep 1
[ -s "$work/run-var/audit/decisions.jsonl" ] || fail "no decision record written to /app/var"
echo "decision log: $(wc -l <"$work/run-var/audit/decisions.jsonl") record(s) in /app/var/audit"

log "image-test: ok ($image, $(( $(date +%s) - started )) s)"

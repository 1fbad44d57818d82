#!/usr/bin/env bash
# Builds the topgun-server image from deploy/image/Dockerfile with buildah and runs the binary
# inside it against /health. Needs buildah and debootstrap (Debian packages) and root.
#
# Public base images cannot be pulled where this project is tested, so when the Dockerfile's
# base (debian:bookworm-slim) is not in local storage it is made here from Debian's packages:
# debootstrap into a `buildah from scratch` container, committed under the base image's usual
# name. The Dockerfile stays the one that builds unchanged anywhere else.
set -euo pipefail
cd "$(dirname "$0")/../.."
buildah=(buildah --storage-driver vfs)
base=docker.io/library/debian:bookworm-slim
image=topgun/server-rust:latest

# The Debian mirror this machine's apt uses (one-line or deb822 sources); debootstrap's own
# default otherwise.
mirror=$(awk '/^deb / {print $2; exit} /^URIs:/ {print $2; exit}' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)

if ! "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
  echo "== base image $base from Debian's packages (debootstrap)"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$rootfs" ${mirror:+"$mirror"} >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$rootfs.tar" .
  ctr=$("${buildah[@]}" from scratch)
  "${buildah[@]}" add "$ctr" "$rootfs.tar" / >/dev/null
  "${buildah[@]}" config --cmd bash "$ctr"
  "${buildah[@]}" commit -q "$ctr" "$base" >/dev/null
  "${buildah[@]}" rm "$ctr" >/dev/null
  rm -rf "$rootfs" "$rootfs.tar"
fi

echo "== $image"
cargo build -q --release --bin topgun-server
"${buildah[@]}" bud -q --isolation chroot --pull-never --format docker \
  -f deploy/image/Dockerfile -t "$image" . >/dev/null

echo "== the binary inside the image"
ctr=$("${buildah[@]}" from --pull-never "$image")
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  "${buildah[@]}" rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
config=$("${buildah[@]}" inspect --type container "$ctr" |
  python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]))')
python3 - "$config" <<'PY'
import json, sys
config = json.loads(sys.argv[1])
assert config["User"] == "10001:10001", config["User"]
assert config["Entrypoint"] == ["/usr/local/bin/topgun-server"], config["Entrypoint"]
assert "/health/live" in " ".join(config["Healthcheck"]["Test"]), config.get("Healthcheck")
print("image config: non-root user, entrypoint, health check on /health/live")
PY
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${buildah[@]}" run --isolation chroot --user 10001:10001 "$ctr" -- \
  /usr/local/bin/topgun-server --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"state":"ready"' && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/health" | grep '"state":"ready"'
# The image's own health check, run inside the container.
healthcheck=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["Healthcheck"]["Test"][-1])' "$config")
# Same command, pointed at the port this run listens on.
"${buildah[@]}" run --isolation chroot --user 10001:10001 "$ctr" -- bash -c "${healthcheck//8080/$port}"
echo "health check inside the container: ok"
# SIGTERM to the server inside: a graceful exit, status 0.
pkill -TERM -f "^/usr/local/bin/topgun-server --host 127.0.0.1 --port $port\$"
status=0
wait "$server" || status=$?
server=""
[ "$status" -eq 0 ] || { echo "the server in the image exited with $status on SIGTERM" >&2; exit 1; }
echo "SIGTERM inside the container: graceful exit"

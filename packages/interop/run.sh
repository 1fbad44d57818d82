#!/usr/bin/env bash
# Interoperability and deployment checks: TopGun's own client (modelled from its behaviour)
# end to end (also through deploy/nginx.conf), the Kubernetes manifest against its schema,
# real clients (Python websockets, Node ws, websocat, headless Chromium) against the interop
# server, a rolling restart behind HAProxy, and the container image built and run.
# Installs what it needs: Debian packages with apt-get, PyPI and npm packages.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v haproxy >/dev/null || missing+=(haproxy)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
command -v buildah >/dev/null || missing+=(buildah)
[ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  echo "== apt-get install ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "== pip / npm packages"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements.txt
npm ci --no-audit --no-fund --loglevel=error

echo "== deploy/: the Kubernetes manifest against the Kubernetes schema (offline)"
python3 -m kubernetes_validate --strict --quiet ../../deploy/kubernetes/*.yaml

echo "== build"
cargo build -q --bin topgun-server
cargo build -q -p topgun-server --example interop_server --example handshake_server
target=../../target/debug

echo "== TopGun's client, end to end"
TOPGUN_SERVER_BIN="$target/topgun-server" \
  HANDSHAKE_SERVER_BIN="$target/examples/handshake_server" \
  NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)" \
  timeout 600 node --test topgun-client/suite.mjs
echo "== TopGun's client, end to end, every server offering permessage-deflate (threshold 64 bytes)"
TOPGUN_PERMESSAGE_DEFLATE=true TOPGUN_DEFLATE_THRESHOLD=64 TOPGUN_SERVER_BIN="$target/topgun-server" \
  HANDSHAKE_SERVER_BIN="$target/examples/handshake_server" \
  NGINX_BIN="$(command -v nginx || echo /usr/sbin/nginx)" \
  timeout 600 node --test topgun-client/suite.mjs

echo "== real clients"
timeout 600 python3 run_clients.py "$target/examples/interop_server"
echo "== real clients, the server offering permessage-deflate"
timeout 600 python3 run_clients.py --permessage-deflate "$target/examples/interop_server"
echo "== rolling restart behind HAProxy"
timeout 600 python3 rolling_restart.py "$target/topgun-server"

echo "== the load harness, against the transport and against its Node.js ws peer (small counts)"
npm ci --prefix ../bench/node --no-audit --no-fund --loglevel=error
cargo build -q -p topgun-bench
for peer in transport node; do
  out=$(timeout 300 "$target/topgun-bench" --server "$peer" \
    fanout --connections 200 --broadcasts 5 --interval-ms 50)
  row=${out%%$'\n'*}
  echo "$row"
  case "$row" in *"delivered_ratio=1.0 "*) ;; *) echo "the $peer peer did not deliver everything" >&2; exit 1 ;; esac
done

echo "== the load harness's permessage-deflate run (small counts): everything delivered, compressed when agreed"
out=$(timeout 300 "$target/topgun-bench" deflate --connections 200 --fanout-connections 200 --broadcasts 5 --interval-ms 50)
echo "$out" | grep '^|'
fanouts=$(echo "$out" | grep '^| fanout')
[ "$(echo "$fanouts" | grep -c 'delivered_ratio=1.0 ')" -eq 2 ] || { echo "the deflate fan-out did not deliver everything" >&2; exit 1; }
echo "$fanouts" | grep 'permessage-deflate on' | grep -qv 'compressed_frames=0 ' || { echo "nothing arrived compressed" >&2; exit 1; }

echo "== the container image (deploy/image) built with buildah and run"
timeout 1200 bash ../../deploy/image/build.sh

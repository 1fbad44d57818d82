#!/usr/bin/env bash
# Instructions the server executes per `GET /health`, counted by valgrind's callgrind: steady
# from run to run, unlike requests per second on a shared machine. Needs valgrind and python3.
#
#   cargo build --release -p topgun-bench
#   packages/bench/scripts/http-instructions.sh            # the transport's full stack
#   packages/bench/scripts/http-instructions.sh --bare     # a bare axum router
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$out"' EXIT

valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.%p" \
    target/release/bench-server "$@" >"$out/stdout" 2>"$out/stderr" &
server=$!
for _ in $(seq 300); do [ -s "$out/stdout" ] && break; sleep 0.1; done
port=$(awk '/^LISTENING/ {print $2}' "$out/stdout")
[ -n "$port" ] || { echo "bench-server did not start" >&2; cat "$out/stderr" >&2; exit 1; }

requests() {
    python3 - "$port" "$1" <<'PY'
import http.client, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(count):
    conn.request("GET", "/health")
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
PY
}

requests 200                      # warm up outside the count
callgrind_control -i on "$server" >/dev/null 2>&1
requests 2000
callgrind_control -i off "$server" >/dev/null 2>&1
kill "$server"; wait "$server" 2>/dev/null || true
total=$(callgrind_annotate "$out"/callgrind.* 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "instructions per request: $((total / 2000))"

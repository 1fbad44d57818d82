#!/usr/bin/env bash
# Instructions the server executes per `GET /health`, or per WebSocket handshake, counted by
# valgrind's callgrind: steady from run to run, unlike requests per second on a shared machine.
# Needs valgrind and python3.
#
#   cargo build --release -p topgun-bench
#   packages/bench/scripts/http-instructions.sh            # the transport's full stack
#   packages/bench/scripts/http-instructions.sh --bare     # a bare axum router
#   packages/bench/scripts/http-instructions.sh --handshakes   # per WebSocket handshake
#
# With --handshakes it counts from the request's arrival until the server has registered the
# connection (it asks /health for the count, one or two requests among 2 000 handshakes), not
# the close, which comes after the count.
set -euo pipefail
cd "$(dirname "$0")/../../.."
mode=requests
if [ "${1:-}" = --handshakes ]; then mode=handshakes; shift; fi
out=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$out"' EXIT

valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.%p" \
    target/release/bench-server "$@" >"$out/stdout" 2>"$out/stderr" &
server=$!
for _ in $(seq 300); do [ -s "$out/stdout" ] && break; sleep 0.1; done
port=$(awk '/^LISTENING/ {print $2}' "$out/stdout")
[ -n "$port" ] || { echo "bench-server did not start" >&2; cat "$out/stderr" >&2; exit 1; }

# Runs `count` requests or handshakes; `instrumented` 1 counts them, between its markers.
client() {
    python3 - "$port" "$mode" "$1" "$2" "$server" <<'PY'
import http.client, json, socket, subprocess, sys, time

port, mode, count, instrumented, server = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]

def instrument(on):
    if instrumented:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", server],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)

def health(conn):
    conn.request("GET", "/health")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, response.status
    return json.loads(body)

conn = http.client.HTTPConnection("127.0.0.1", port)
if mode == "requests":
    instrument(True)
    for _ in range(count):
        health(conn)
    instrument(False)
    sys.exit()

upgrade = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

def wait_for(connections):
    deadline = time.monotonic() + 60
    while health(conn)["connections"] != connections:
        assert time.monotonic() < deadline, f"the server never counted {connections} connections"
        time.sleep(0.01)

wait_for(0)  # the warm-up's connections are gone
sockets = []
instrument(True)
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(upgrade)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:40]
    sockets.append(sock)
wait_for(count)
instrument(False)
for sock in sockets:
    sock.close()
PY
}

client 200 0                      # warm up outside the count
client 2000 1
kill "$server"; wait "$server" 2>/dev/null || true
total=$(callgrind_annotate "$out"/callgrind.* 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
if [ "$mode" = handshakes ]; then
    echo "instructions per WebSocket handshake: $((total / 2000))"
else
    echo "instructions per request: $((total / 2000))"
fi

"""Runs each real client against a fresh interop server and checks it end to end.

For every client: start the server, run the client's scripted session (echo, burst unpacked
from BATCH frames, and for the browser a cross-origin POST /sync), wait for it to print READY,
send the server SIGTERM, and check that the client saw the close and that both exit cleanly.

With --permessage-deflate the server offers compression, and every client that asks for it
(all but websocat) must report it negotiated; without, none may.

Usage: python3 run_clients.py [--permessage-deflate] PATH/TO/interop_server [client...]
"""

import os
import subprocess
import sys
import time
import urllib.request

from support import STEP_TIMEOUT, free_port, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENTS = {
    "python websockets": ["python3", "clients/python_client.py", "{ws}"],
    "node ws": ["node", "clients/node_client.mjs", "{ws}"],
    "websocat": ["python3", "clients/websocat_client.py", "{ws}"],
    "chromium": ["node", "clients/browser_client.mjs", "{http}"],
}
# The clients that offer permessage-deflate by default (websocat does not).
OFFER_DEFLATE = {"python websockets", "node ws", "chromium"}
AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def is_ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status == 200


def run_client(name: str, command: list, server_bin: str, deflate: bool) -> bool:
    port = free_port()
    flags = ["--permessage-deflate"] if deflate else []
    server = subprocess.Popen([server_bin, "--port", str(port), *flags], stdout=subprocess.DEVNULL)
    try:
        ready = f"http://127.0.0.1:{port}/health/ready"
        wait_for(ready, lambda: is_ready(ready))
        args = [a.format(ws=f"ws://127.0.0.1:{port}/ws", http=f"http://127.0.0.1:{port}") for a in command]
        client = subprocess.Popen(args, cwd=HERE, stdout=subprocess.PIPE, text=True)
        lines = []
        deadline = time.monotonic() + STEP_TIMEOUT
        for line in client.stdout:
            lines.append(line.rstrip())
            if line.strip() == "READY":
                break
            if time.monotonic() > deadline:
                break
        if lines[-1:] != ["READY"]:
            client.kill()
            print(f"FAIL {name}: no READY\n  " + "\n  ".join(lines))
            return False
        server.terminate()  # SIGTERM: graceful shutdown
        rest, _ = client.communicate(timeout=STEP_TIMEOUT)
        lines += rest.splitlines()
        server_rc = server.wait(timeout=STEP_TIMEOUT)
        ok = client.returncode == 0 and server_rc == 0
        negotiated = "permessage-deflate" in "\n".join(lines)
        if name in OFFER_DEFLATE and negotiated != deflate:
            lines.append(f"permessage-deflate negotiated: {negotiated}, expected {deflate}")
            ok = False
        if negotiated and AGREED not in "\n".join(lines):
            lines.append("permessage-deflate negotiated without both no-context-takeover parameters")
            ok = False
        print(("PASS" if ok else "FAIL") + f" {name}: " + " | ".join(lines) + f" | server exit {server_rc}")
        return ok
    finally:
        if server.poll() is None:
            server.kill()


def main() -> int:
    args = sys.argv[1:]
    deflate = "--permessage-deflate" in args
    args = [arg for arg in args if arg != "--permessage-deflate"]
    server_bin = os.path.abspath(args[0])
    only = set(args[1:])
    if deflate:
        print("(server offering permessage-deflate)")
    results = {
        name: run_client(name, cmd, server_bin, deflate) for name, cmd in CLIENTS.items() if not only or name in only
    }
    passed = sum(results.values())
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

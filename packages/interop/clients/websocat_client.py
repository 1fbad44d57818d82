"""websocat client: the same scripted session, driven through the `websocat` command line tool.

websocat runs with `--base64 --binary-prefix B`: lines written to it as `B<base64>` are sent as
binary messages, and binary messages received come out as `B<base64>` lines.

Usage: python3 websocat_client.py ws://127.0.0.1:8080/ws
"""

import base64
import subprocess
import sys

import msgpack

from python_client import unpack_frame


def main(url: str) -> int:
    ws = subprocess.Popen(
        ["websocat", "-v", "--base64", "--binary-prefix", "B", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pending = []

    def send(value):
        ws.stdin.write("B" + base64.b64encode(msgpack.packb(value)).decode() + "\n")
        ws.stdin.flush()

    def next_message():
        while not pending:
            line = ws.stdout.readline()
            assert line.startswith("B"), f"expected a binary message line, got {line!r}"
            batched, messages = unpack_frame(base64.b64decode(line[1:]))
            pending.extend((batched, m) for m in messages)
        return pending.pop(0)

    for n in range(3):
        send({"type": "PING", "n": n})
        assert msgpack.unpackb(next_message()[1]) == {"type": "PING", "n": n}
    send({"type": "BURST", "count": 50})
    batched_seen = 0
    for seq in range(50):
        batched, message = next_message()
        assert msgpack.unpackb(message) == {"type": "ITEM", "seq": seq}
        batched_seen += batched
    assert batched_seen > 0, "the burst arrived without any BATCH frame"
    print(f"SESSION echoed=3 burst=50 batched={batched_seen}", flush=True)
    print("READY", flush=True)
    # websocat exits when the server closes; its log says it received the close frame, but
    # websocat 1.x does not print the close code, so the code is checked by the other clients.
    _, stderr = ws.communicate(timeout=60)
    received_close = "Received WebSocket close message" in stderr
    print("CLOSE received" if received_close else f"NO CLOSE: {stderr[-500:]}", flush=True)
    return 0 if received_close and ws.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""websocat client: the same scripted session, driven through the `websocat` command line tool.

websocat connects through `CloseTap`, a relay that records what the server sends. websocat
runs with `--base64 --binary-prefix B`: lines written to it as `B<base64>` are sent as
binary messages, and binary messages received come out as `B<base64>` lines.

Usage: python3 websocat_client.py ws://127.0.0.1:8080/ws
"""

import base64
import socket
import struct
import subprocess
import sys
import threading
import urllib.parse

import msgpack

from python_client import unpack_frame


class CloseTap:
    """A loopback TCP relay between websocat and the server that reads the server-to-client
    bytes as they pass, so the close frame websocat receives can be checked: websocat itself
    logs a close but does not print its code."""

    def __init__(self, target: tuple):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.from_server = bytearray()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        threading.Thread(target=self.pipe, args=(client, server, None), daemon=True).start()
        self.pipe(server, client, self.from_server)

    @staticmethod
    def pipe(source, sink, record) -> None:
        while data := source.recv(65536):
            if record is not None:
                record.extend(data)
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)

    def close_frame(self):
        """(code, reason) of the first close frame the server sent, if any."""
        data = bytes(self.from_server)
        rest = data[data.index(b"\r\n\r\n") + 4 :]
        while len(rest) >= 2:
            opcode, length, header = rest[0] & 0x0F, rest[1] & 0x7F, 2
            if length == 126:
                (length,), header = struct.unpack(">H", rest[2:4]), 4
            elif length == 127:
                (length,), header = struct.unpack(">Q", rest[2:10]), 10
            payload = rest[header : header + length]
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0], payload[2:].decode()
            rest = rest[header + length :]
        return None


def main(url: str) -> int:
    parsed = urllib.parse.urlsplit(url)
    tap = CloseTap((parsed.hostname, parsed.port))
    url = f"ws://127.0.0.1:{tap.port}{parsed.path}"
    ws = subprocess.Popen(
        ["websocat", "-v", "-E", "--base64", "--binary-prefix", "B", url],
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
    # websocat exits when the server closes; its log confirms it processed a close frame and
    # the tap shows which one it was given.
    # stdin stays open: its end would make websocat close the connection itself.
    ws.stdout.read()
    ws.wait(timeout=60)
    stderr = ws.stderr.read()
    received_close = "Received WebSocket close message" in stderr
    frame = tap.close_frame()
    if not received_close or frame is None:
        print(f"NO CLOSE: tapped {frame}, websocat said {stderr[-300:]!r}", flush=True)
        return 1
    code, reason = frame
    print(f"CLOSE {code} {reason}", flush=True)
    return 0 if (code, reason) == (1001, "server shutting down") and ws.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Python `websockets` client: scripted session, then waits for the server's close.

Usage: python3 python_client.py ws://127.0.0.1:8080/ws
"""

import asyncio
import struct
import sys

import msgpack
import websockets


def unpack_frame(frame: bytes):
    """Messages in a frame, unpacking TopGun's BATCH envelope as its client does."""
    try:
        envelope = msgpack.unpackb(frame, raw=False)
    except Exception:
        return False, [frame]
    if not isinstance(envelope, dict) or envelope.get("type") != "BATCH":
        return False, [frame]
    data = envelope["data"]
    (count,) = struct.unpack_from("<I", data, 0)
    assert count == envelope["count"], (count, envelope["count"])
    offset, messages = 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        messages.append(data[offset : offset + length])
        offset += length
    assert offset == len(data), "trailing bytes in BATCH"
    return True, messages


async def main(url: str) -> int:
    async with websockets.connect(url, max_size=None) as ws:
        print(f"EXTENSIONS {ws.response.headers.get('Sec-WebSocket-Extensions', 'none')}", flush=True)
        pending = []

        async def next_message():
            while not pending:
                frame = await ws.recv()
                assert isinstance(frame, bytes), "binary frames only"
                batched, messages = unpack_frame(frame)
                pending.extend((batched, m) for m in messages)
            return pending.pop(0)

        for n in range(3):
            await ws.send(msgpack.packb({"type": "PING", "n": n}))
            _, message = await next_message()
            assert msgpack.unpackb(message) == {"type": "PING", "n": n}
        await ws.send(msgpack.packb({"type": "BURST", "count": 50}))
        batched_seen = 0
        for seq in range(50):
            batched, message = await next_message()
            assert msgpack.unpackb(message) == {"type": "ITEM", "seq": seq}, message
            batched_seen += batched
        assert batched_seen > 0, "the burst arrived without any BATCH frame"
        print(f"SESSION echoed=3 burst=50 batched={batched_seen}", flush=True)
        print("READY", flush=True)
        try:
            await ws.recv()
            print("unexpected message instead of close", flush=True)
            return 1
        except websockets.ConnectionClosed as closed:
            code, reason = closed.rcvd.code, closed.rcvd.reason
    print(f"CLOSE {code} {reason}", flush=True)
    return 0 if (code, reason) == (1001, "server shutting down") else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))

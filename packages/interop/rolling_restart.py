"""A rolling restart of two topgun-server nodes behind HAProxy, under load.

While a loop of POST /sync requests runs through HAProxy and 200 WebSocket clients stay
connected through it, each node in turn gets SIGTERM, exits, and is started again. Expected:
no failed HTTP request, every WebSocket client on a stopping node receives close 1001 and
reconnects through HAProxy to the live node, and nothing hangs. Prints the counts and exits
non-zero if any is off.

Usage: python3 rolling_restart.py PATH/TO/topgun-server
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import http.client

import msgpack
import websockets

from support import STEP_TIMEOUT, free_port, wait_for

CLIENTS = 200
GRACE = "2s"
HERE = os.path.dirname(os.path.abspath(__file__))
HAPROXY_CFG = os.path.join(HERE, "..", "..", "deploy", "haproxy.cfg")


class ProxiedConnection(http.client.HTTPConnection):
    """Speaks to a node directly, as HAProxy does: a PROXY protocol v1 line first."""

    def connect(self):
        super().connect()
        (src, sport), (dst, dport) = self.sock.getsockname(), self.sock.getpeername()
        self.sock.sendall(f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode())


def get_json(port: int, path: str, proxied: bool = False):
    """GET `path`; `proxied` for a node, which accepts only connections with a PROXY header."""
    connection = ProxiedConnection if proxied else http.client.HTTPConnection
    conn = connection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


class Node:
    def __init__(self, binary: str, name: str):
        self.binary, self.name, self.port, self.process = binary, name, free_port(), None

    def start(self) -> None:
        self.process = subprocess.Popen(
            # deploy/haproxy.cfg names each client with a PROXY protocol v2 header.
            [self.binary, "--host", "127.0.0.1", "--port", str(self.port), "--shutdown-grace", GRACE,
             "--proxy-protocol"],
            stdout=subprocess.DEVNULL,
        )
        wait_for(f"{self.name} ready", lambda: get_json(self.port, "/health/ready", proxied=True)[0] == 200)

    def connections(self) -> int:
        return get_json(self.port, "/health", proxied=True)[1]["connections"]

    def refuses_bare_connections(self) -> bool:
        """A connection without a PROXY header is closed before any answer."""
        try:
            get_json(self.port, "/health")
        except (OSError, http.client.HTTPException):
            return True
        return False

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=STEP_TIMEOUT)


class HAProxy:
    def __init__(self, nodes):
        self.port = free_port()
        self.socket_path = tempfile.mktemp(prefix="topgun-haproxy-", suffix=".sock")
        env = dict(
            os.environ,
            TOPGUN_LB_BIND=f"127.0.0.1:{self.port}",
            TOPGUN_LB_STATS_SOCKET=self.socket_path,
            TOPGUN_NODE1=f"127.0.0.1:{nodes[0].port}",
            TOPGUN_NODE2=f"127.0.0.1:{nodes[1].port}",
        )
        self.process = subprocess.Popen(["haproxy", "-db", "-f", HAPROXY_CFG], env=env, stderr=subprocess.DEVNULL)
        wait_for("haproxy socket", lambda: os.path.exists(self.socket_path))

    def status(self, server: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket_path)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines()]
        header = rows[0]
        for row in rows[1:]:
            if len(row) > 17 and row[0] == "topgun_nodes" and row[1] == server:
                return row[header.index("status")]
        return "missing"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=STEP_TIMEOUT)


class HttpLoad:
    """POST /sync in a loop through HAProxy, counting answers other than 200."""

    def __init__(self, port: int, threads: int = 2):
        self.port, self.ok, self.failed, self.errors = port, 0, 0, []
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        body = msgpack.packb({"type": "SYNC_INIT", "mapName": "todos"})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stopping.is_set():
            try:
                conn.request("POST", "/sync", body=body, headers={"content-type": "application/msgpack"})
                response = conn.getresponse()
                response.read()
                good = response.status == 200
                problem = None if good else f"status {response.status}"
            except (OSError, http.client.HTTPException) as err:
                good, problem = False, repr(err)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self.lock:
                if good:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(problem)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=STEP_TIMEOUT)


class WsClients:
    """WebSocket clients through HAProxy that reconnect after a 1001 close."""

    def __init__(self, port: int):
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.closes_1001 = self.reconnects = 0
        self.unexpected = []
        self.connected = 0
        self.stopping = asyncio.Event()

    async def client(self) -> None:
        first = True
        while not self.stopping.is_set():
            try:
                async with websockets.connect(self.url, open_timeout=10) as ws:
                    self.connected += 1
                    if not first:
                        self.reconnects += 1
                    first = False
                    stop = asyncio.ensure_future(self.stopping.wait())
                    recv = asyncio.ensure_future(ws.recv())
                    await asyncio.wait([stop, recv], return_when=asyncio.FIRST_COMPLETED)
                    self.connected -= 1
                    if stop.done():
                        recv.cancel()
                        return
                    stop.cancel()
                    try:
                        recv.result()
                        self.unexpected.append("unexpected message")
                    except websockets.ConnectionClosed as closed:
                        if closed.rcvd is not None and closed.rcvd.code == 1001:
                            self.closes_1001 += 1
                        else:
                            self.unexpected.append(f"closed with {closed.rcvd}")
            except (OSError, websockets.InvalidStatus, asyncio.TimeoutError) as err:
                self.unexpected.append(f"connect failed: {err!r}")
                await asyncio.sleep(0.1)


async def main(binary: str) -> int:
    nodes = [Node(binary, "node1"), Node(binary, "node2")]
    for node in nodes:
        node.start()
    strict = all(node.refuses_bare_connections() for node in nodes)
    print(f"nodes refuse connections without a PROXY header: {strict}")
    lb = HAProxy(nodes)
    try:
        for name in ("node1", "node2"):
            wait_for(f"haproxy sees {name} up", lambda name=name: lb.status(name) == "UP")
        load = HttpLoad(lb.port)
        ws = WsClients(lb.port)
        tasks = [asyncio.create_task(ws.client()) for _ in range(CLIENTS)]
        await asyncio.to_thread(wait_for, "all clients connected", lambda: ws.connected == CLIENTS)

        expected_1001 = 0
        exits = []
        for index, node in enumerate(nodes):
            on_node = node.connections()
            expected_1001 += on_node
            started = time.monotonic()
            exits.append(await asyncio.to_thread(node.stop))
            stopped_after = time.monotonic() - started
            await asyncio.to_thread(node.start)
            name = f"node{index + 1}"
            await asyncio.to_thread(wait_for, f"haproxy sees {name} up again", lambda n=name: lb.status(n) == "UP")
            await asyncio.to_thread(
                wait_for, "every client reconnected", lambda: ws.connected == CLIENTS and ws.reconnects == expected_1001
            )
            print(f"{node.name}: {on_node} WebSocket clients, stopped in {stopped_after:.2f}s, back up")

        load.stop()
        ws.stopping.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=STEP_TIMEOUT)
    finally:
        lb.stop()
        for node in nodes:
            if node.process.poll() is None:
                node.stop()

    print(f"HTTP POST /sync: {load.ok} ok, {load.failed} failed {load.errors[:5]}")
    print(f"WebSocket: {CLIENTS} clients, {ws.closes_1001} closes with 1001 (expected {expected_1001}), "
          f"{ws.reconnects} reconnects, {len(ws.unexpected)} unexpected {ws.unexpected[:5]}")
    print(f"node exit codes on SIGTERM: {exits}")
    ok = (
        strict
        and load.failed == 0
        and load.ok > 0
        and ws.closes_1001 == expected_1001
        and ws.reconnects == expected_1001
        and not ws.unexpected
        and exits == [0, 0]
    )
    print("rolling-restart: " + ("1 passed, 0 failed" if ok else "0 passed, 1 failed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(os.path.abspath(sys.argv[1]))))

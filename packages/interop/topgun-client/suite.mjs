// End-to-end: the TopGun client model (client.mjs) against the `topgun-server` binary and the
// `handshake_server` example. Run by run.sh:
//
//   TOPGUN_SERVER_BIN=target/debug/topgun-server \
//   HANDSHAKE_SERVER_BIN=target/debug/examples/handshake_server \
//   node --test packages/interop/topgun-client/suite.mjs
//
// TOPGUN_E2E_HOLD_SECS (default 60) is how long the clients stay connected in the first part.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, it } from "node:test";

import WebSocket from "ws";

import {
  HEARTBEAT_INTERVAL_MS,
  TopGunClientModel,
  httpSync,
  serialize,
} from "./client.mjs";

const SERVER_BIN = required("TOPGUN_SERVER_BIN");
const HANDSHAKE_BIN = required("HANDSHAKE_SERVER_BIN");
const HOLD_MS = Number(process.env.TOPGUN_E2E_HOLD_SECS ?? 60) * 1000;
const TICKS_PER_SECOND = 1000;
const NGINX = process.env.NGINX_BIN;
// Set for the run in which every server offers permessage-deflate (the binary and the examples
// read it from the environment).
const DEFLATE = ["1", "true"].includes(process.env.TOPGUN_PERMESSAGE_DEFLATE ?? "");
const AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
const DEPLOY = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "deploy");

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`set ${name}`);
  return value;
}

const running = new Set();

/// Starts a server binary on 127.0.0.1 and resolves once it logs its listening address.
function startServer(bin, args = []) {
  const child = spawn(bin, ["--host", "127.0.0.1", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: "info", NO_COLOR: "1" },
  });
  running.add(child);
  child.exited = new Promise((resolve) =>
    child.on("exit", (code, signal) => {
      running.delete(child);
      resolve({ code, signal });
    }),
  );
  return new Promise((resolve, reject) => {
    let output = "";
    const timer = setTimeout(() => reject(new Error(`${bin} did not start:\n${output}`)), 30000);
    const onData = (chunk) => {
      output += chunk;
      const found = /listening addr=([\d.]+):(\d+)/.exec(output);
      if (found) {
        clearTimeout(timer);
        resolve({ child, port: Number(found[2]), output: () => output });
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.on("exit", (code) => reject(new Error(`${bin} exited with ${code}:\n${output}`)));
  });
}

async function stopServer(server, signal = "SIGTERM") {
  server.child.kill(signal);
  const result = await withDeadline(server.child.exited, 30000, "server exit");
  return result;
}

function withDeadline(promise, ms, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/// Polls `predicate` until it holds; fails with `what` after `ms`.
async function until(predicate, ms, what) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/// Gives the last PING time to be answered; the tests then judge what arrived.
async function settle(client) {
  await until(() => client.stats.pongs >= client.stats.pingsSent, 3000, "the last PONG").catch(
    () => {},
  );
}

function trackTicks(client) {
  const ticks = { first: null, last: null, count: 0, gaps: 0, batched: 0 };
  client.onMessage = (message, { batched }) => {
    if (message.type !== "TICK") return;
    if (ticks.first === null) ticks.first = message.seq;
    else if (message.seq !== ticks.last + 1) ticks.gaps++;
    ticks.last = message.seq;
    ticks.count++;
    if (batched) ticks.batched++;
  };
  return ticks;
}

after(() => {
  for (const child of running) child.kill("SIGKILL");
});

it("serializes exactly as TopGun's client serializer", () => {
  // Bytes from the README, produced by the client's own serialize().
  const ping = serialize({ type: "PING", timestamp: 1796023824376 });
  assert.equal(
    Buffer.from(ping).toString("hex"),
    "de0002a474797065a450494e47a974696d657374616d70cb427a22b5caff8000",
  );
  const hlc = serialize({ millis: 1796023824376, counter: 0, nodeId: "n" });
  assert.equal(
    Buffer.from(hlc).toString("hex"),
    "de0003a66d696c6c6973cb427a22b5caff8000a7636f756e74657200a66e6f64654964a16e",
  );
});

describe(`stays connected for ${HOLD_MS / 1000} s`, () => {
  let binary;
  let example;
  let compressedFrames = 0;
  const clients = {};
  let ticks;

  before(async () => {
    binary = await startServer(SERVER_BIN, ["--port", "0"]);
    example = await startServer(HANDSHAKE_BIN, [
      "--port",
      "0",
      "--ticks-per-second",
      String(TICKS_PER_SECOND),
    ]);
    clients.root = new TopGunClientModel(`ws://127.0.0.1:${binary.port}`);
    clients.ws = new TopGunClientModel(`ws://127.0.0.1:${binary.port}/ws`);
    clients.load = new TopGunClientModel(`ws://127.0.0.1:${example.port}`);
    ticks = trackTicks(clients.load);
    for (const client of Object.values(clients)) client.connect();
    await sleep(HOLD_MS);
    // Read before the clients settle, not in a test: an await after they settle would let a
    // client's next PING go out unanswered before its test looks.
    const metrics = await (await fetch(`http://127.0.0.1:${example.port}/metrics`)).text();
    compressedFrames = Number(/^topgun_websocket_compressed_frames_total (\d+)/m.exec(metrics)?.[1] ?? 0);
    for (const client of Object.values(clients)) await settle(client);
  });

  after(async () => {
    for (const client of Object.values(clients)) client.close();
    await Promise.all([binary && stopServer(binary), example && stopServer(example)]);
  });

  for (const name of ["root", "ws"]) {
    it(`binary, ${name === "root" ? "root URL ws://host:port" : "ws://host:port/ws"}: no reconnect, every PING answered`, () => {
      const { stats } = clients[name];
      assert.equal(stats.opens, 1, "opened once");
      assert.equal(stats.failedAttempts, 0);
      assert.equal(stats.forcedReconnects, 0, "the heartbeat never gave up");
      assert.deepEqual(stats.closes, []);
      assert.equal(stats.connectedAt[0].how, "grace timer", "the stub says nothing: connected after 500 ms");
      const expectedPings = Math.floor(HOLD_MS / HEARTBEAT_INTERVAL_MS) - 1;
      assert.ok(stats.pingsSent >= expectedPings, `${stats.pingsSent} PINGs, expected ${expectedPings}+`);
      assert.equal(stats.pongs, stats.pingsSent, "every PING answered by a top-level PONG");
      assert.equal(stats.pongsInBatch, 0);
    });
  }

  it(`permessage-deflate ${DEFLATE ? "negotiated by every client, the load's BATCH frames compressed" : "not negotiated: the server does not offer it"}`, () => {
    for (const [name, client] of Object.entries(clients)) {
      assert.equal(client.stats.extensions, DEFLATE ? AGREED : null, name);
    }
    // The heartbeat above held while the example's broadcasts reached the client compressed.
    if (DEFLATE) assert.ok(compressedFrames > 100, `${compressedFrames} compressed frames`);
    else assert.equal(compressedFrames, 0);
  });

  it(`example broadcasting ${TICKS_PER_SECOND} messages/s: all counted through BATCH, PONGs top-level, no reconnect`, () => {
    const { stats } = clients.load;
    assert.equal(stats.opens, 1);
    assert.equal(stats.forcedReconnects, 0);
    assert.deepEqual(stats.closes, []);
    assert.equal(stats.connectedAt[0].how, "DEVICE_ACK", "the handshake reply arrived");
    assert.equal(stats.pongs, stats.pingsSent, "every PING answered by a top-level PONG");
    assert.ok(stats.pingsSent >= Math.floor(HOLD_MS / HEARTBEAT_INTERVAL_MS) - 1);
    assert.equal(stats.pongsInBatch, 0, "no PONG inside a BATCH");
    assert.equal(ticks.gaps, 0, "no broadcast message missing");
    assert.equal(ticks.count, ticks.last - ticks.first + 1);
    const expected = (TICKS_PER_SECOND * (HOLD_MS - 1000)) / 1000 * 0.9;
    assert.ok(ticks.count >= expected, `${ticks.count} messages, expected ${expected}+`);
    assert.ok(ticks.batched > 0 && stats.batchFrames > 0, "messages were coalesced into BATCH frames");
    console.log(
      `# load: ${ticks.count} TICKs (${ticks.batched} batched) in ${stats.frames} frames, ` +
        `${stats.pingsSent} PINGs, ${stats.pongs} top-level PONGs, RTT ${clients.load.lastRoundTripTime} ms`,
    );
  });
});

describe("topics: TOPIC_SUB, TOPIC_UNSUB, TOPIC_PUB relayed as TOPIC_MESSAGE", () => {
  let example;

  before(async () => {
    example = await startServer(HANDSHAKE_BIN, ["--port", "0"]);
  });

  after(async () => {
    if (example) await stopServer(example);
  });

  /// A gauge or counter of the example's /metrics.
  async function metric(name) {
    const text = await (await fetch(`http://127.0.0.1:${example.port}/metrics`)).text();
    return Number(new RegExp(`^${name} (\\d+)`, "m").exec(text)?.[1] ?? NaN);
  }

  async function untilMetric(name, value, ms = 10000) {
    const deadline = Date.now() + ms;
    let seen;
    while ((seen = await metric(name)) !== value) {
      if (Date.now() > deadline) throw new Error(`${name} is ${seen}, expected ${value}`);
      await sleep(20);
    }
  }

  /// A client model that collects the payloads of the TOPIC_MESSAGEs it receives.
  function topicClient(received) {
    const client = new TopGunClientModel(`ws://127.0.0.1:${example.port}`, {
      onMessage: (message) => {
        if (message.type === "TOPIC_MESSAGE") received.push(message.payload);
      },
    });
    client.connect();
    return client;
  }

  it("a subscriber receives the data and the publisher does not; unsubscribing stops delivery; a disconnect leaves no subscription", async () => {
    const toAlice = [];
    const toBob = [];
    const alice = topicClient(toAlice);
    const bob = topicClient(toBob);
    try {
      // Made before the clients are connected: sent on reaching CONNECTED, as TopicManager does.
      alice.subscribeTopic("chat");
      alice.subscribeTopic("control");
      bob.subscribeTopic("chat");
      await untilMetric("topgun_topic_subscriptions", 3);

      const data = { text: "hi", at: 1796023824376, tags: ["a", "b"] };
      bob.publish("chat", data);
      await until(() => toAlice.length === 1, 10000, "alice receives bob's message");
      const [message] = toAlice;
      assert.equal(message.topic, "chat");
      assert.deepEqual(message.data, data, "the data as published, float64 millis included");
      assert.match(message.publisherId, /^device-\d+$/);
      assert.ok(Math.abs(message.timestamp - Date.now()) < 60000, `timestamp ${message.timestamp}`);

      // Alice publishes to the topic both hold: bob hears it, alice does not. Bob's marker on a
      // topic only alice holds is relayed after alice's publish was, so her own message would
      // have reached her before it.
      alice.publish("chat", "from alice");
      await until(() => toBob.length === 1, 10000, "bob receives alice's message");
      assert.equal(toBob[0].data, "from alice");
      bob.publish("control", "marker 1");
      await until(() => toAlice.length === 2, 10000, "alice receives the marker");
      assert.deepEqual(toAlice.map((p) => p.data), [data, "marker 1"]);

      alice.unsubscribeTopic("chat");
      await untilMetric("topgun_topic_subscriptions", 2);
      bob.publish("chat", "after alice left");
      bob.publish("control", "marker 2");
      await until(() => toAlice.length === 3, 10000, "alice receives the second marker");
      assert.equal(toAlice[2].data, "marker 2", "nothing from a topic alice left");
      assert.deepEqual(toBob.map((p) => p.data), ["from alice"], "bob never hears himself");
    } finally {
      alice.close();
      bob.close();
    }
    await untilMetric("topgun_topic_subscriptions", 0);
    await untilMetric("topgun_topics", 0);
  });

  it("1 000 subscribers of one topic each receive every one of 100 messages, in order", async () => {
    const SUBSCRIBERS = 1000;
    const MESSAGES = 100;
    const received = Array.from({ length: SUBSCRIBERS }, () => []);
    const subscribers = received.map((log) => topicClient(log));
    const publisher = topicClient([]);
    try {
      for (const client of subscribers) client.subscribeTopic("fan-out");
      await untilMetric("topgun_topic_subscriptions", SUBSCRIBERS, 60000);
      await until(() => publisher.state === "CONNECTED", 10000, "the publisher connected");
      for (let seq = 0; seq < MESSAGES; seq++) publisher.publish("fan-out", { seq });
      const expected = Array.from({ length: MESSAGES }, (_, seq) => seq);
      await until(
        () => received.every((log) => log.length >= MESSAGES),
        60000,
        "every subscriber receives every message",
      );
      for (const [i, log] of received.entries()) {
        assert.deepEqual(log.map((p) => p.data.seq), expected, `subscriber ${i}`);
      }
      const frames = subscribers.reduce((sum, client) => sum + client.stats.frames, 0);
      console.log(
        `# topics: ${SUBSCRIBERS} subscribers x ${MESSAGES} messages delivered in ${frames} frames`,
      );
    } finally {
      for (const client of [...subscribers, publisher]) client.close();
    }
    await untilMetric("topgun_topic_subscriptions", 0, 30000);
  });
});

describe("large server messages", () => {
  let example;
  let client;
  const received = [];

  before(async () => {
    example = await startServer(HANDSHAKE_BIN, ["--port", "0"]);
    client = new TopGunClientModel(`ws://127.0.0.1:${example.port}`, {
      onMessage: (message) => {
        if (message.type === "BIG") received.push(message.data.length);
      },
    });
    client.connect();
    await until(() => client.state === "CONNECTED", 10000, "connected");
  });

  after(async () => {
    client?.close();
    if (example) await stopServer(example);
  });

  for (const [label, bytes] of [["1 MiB", 1 << 20], ["8 MiB", 8 << 20]]) {
    it(`a ${label} message arrives whole`, async () => {
      const before = received.length;
      assert.ok(client.send({ type: "BIG", bytes }));
      await until(() => received.length > before, 20000, `the ${label} message`);
      // {type: "BIG", data: <bin32>} is 20 bytes besides the data.
      assert.equal(received[before], bytes - 20);
      assert.equal(client.stats.opens, 1, "still the first connection");
      assert.deepEqual(client.stats.closes, []);
    });
  }
});

describe("SIGTERM", () => {
  it("the client sees 1001 and reconnects when the server is back on its port", async () => {
    const first = await startServer(SERVER_BIN, ["--port", "0"]);
    const port = first.port;
    const client = new TopGunClientModel(`ws://127.0.0.1:${port}`);
    client.connect();
    try {
      await until(() => client.state === "CONNECTED", 10000, "connected");
      const exit = await stopServer(first, "SIGTERM");
      assert.equal(exit.code, 0, "graceful exit");
      await until(() => client.stats.closes.length === 1, 5000, "the close");
      assert.equal(client.stats.closes[0].code, 1001);
      assert.equal(client.stats.closes[0].reason, "server shutting down");
      const second = await startServer(SERVER_BIN, ["--port", String(port)]);
      try {
        await until(() => client.stats.opens === 2, 20000, "the reconnect");
        await until(() => client.stats.connectedAt.length === 2, 5000, "connected again");
        const pongs = client.stats.pongs;
        await until(() => client.stats.pongs > pongs, 2 * HEARTBEAT_INTERVAL_MS + 2000, "a PONG after reconnecting");
      } finally {
        await stopServer(second);
      }
    } finally {
      client.close();
    }
  });
});

describe("HTTP sync", () => {
  const syncBody = (millis) => ({
    clientId: "client-1",
    clientHlc: { millis, counter: 0, nodeId: "client-1" },
    operations: undefined,
    syncMaps: [{ mapName: "todos", lastSyncTimestamp: { millis: millis - 1000, counter: 3, nodeId: "client-1" } }],
  });

  it("the handler sees the client's headers and body", async () => {
    const example = await startServer(HANDSHAKE_BIN, ["--port", "0"]);
    try {
      const millis = Date.now();
      // The body carries millis as float64, as the client writes it.
      assert.ok(Buffer.from(serialize(syncBody(millis))).includes(0xcb));
      const response = await httpSync(`ws://127.0.0.1:${example.port}/`, "test-token", syncBody(millis));
      assert.equal(response.status, 200);
      const seen = response.body.seen;
      assert.equal(seen.bearerToken, "test-token");
      assert.equal(seen.contentType, "application/x-msgpack");
      assert.equal(seen.requestId, response.headers.get("x-request-id"));
      assert.equal(seen.peerIp, "127.0.0.1");
      assert.equal(seen.clientId, "client-1");
      assert.deepEqual(seen.clientHlc, { millis, counter: 0, nodeId: "client-1" });
      assert.equal(typeof response.body.serverHlc.millis, "number");

      const anonymous = await httpSync(`ws://127.0.0.1:${example.port}`, null, syncBody(millis));
      assert.equal(anonymous.status, 200);
      assert.equal(anonymous.body.seen.bearerToken, null, "'Bearer ' without a token is no token");
    } finally {
      await stopServer(example);
    }
  });

  it("the binary's stub answers an empty array, which the client takes as success", async () => {
    const binary = await startServer(SERVER_BIN, ["--port", "0"]);
    try {
      const response = await httpSync(`ws://127.0.0.1:${binary.port}`, "t", syncBody(Date.now()));
      assert.equal(response.status, 200);
      assert.deepEqual(response.body, []);
    } finally {
      await stopServer(binary);
    }
  });
});

/// Runs deploy/nginx.conf as shipped, with loopback addresses in place of its upstream servers
/// and listen port; resolves once nginx answers.
async function startNginx(upstreamPorts) {
  const dir = mkdtempSync(join(tmpdir(), "topgun-nginx-"));
  let site = readFileSync(join(DEPLOY, "nginx.conf"), "utf8");
  const servers = [...site.matchAll(/^\s*server (\S+:\d+)/gm)].map((m) => m[1]);
  assert.equal(servers.length, upstreamPorts.length, "one upstream server per node");
  servers.forEach((server, i) => {
    site = site.replace(server, `127.0.0.1:${upstreamPorts[i]}`);
  });
  const port = await new Promise((resolve) => {
    const probe = createServer();
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
  site = site.replace(/listen 80;/, `listen 127.0.0.1:${port};`);
  writeFileSync(join(dir, "site.conf"), site);
  writeFileSync(
    join(dir, "nginx.conf"),
    `pid ${dir}/nginx.pid;\nerror_log ${dir}/error.log;\nevents {}\nhttp {\n` +
      `  access_log off;\n  client_body_temp_path ${dir};\n  proxy_temp_path ${dir};\n` +
      `  include ${dir}/site.conf;\n}\n`,
  );
  const check = spawnSync(NGINX, ["-t", "-p", dir, "-c", join(dir, "nginx.conf")], { encoding: "utf8" });
  assert.equal(check.status, 0, `nginx -t: ${check.stderr}`);
  const child = spawn(NGINX, ["-p", dir, "-c", join(dir, "nginx.conf"), "-g", "daemon off;"], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  running.add(child);
  child.exited = new Promise((resolve) => child.on("exit", () => (running.delete(child), resolve())));
  const deadline = Date.now() + 10000;
  for (;;) {
    try {
      const response = await fetch(`http://127.0.0.1:${port}/health/live`);
      if (response.status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error("nginx did not start");
    await sleep(50);
  }
  return { child, port };
}

describe("behind nginx (deploy/nginx.conf)", { skip: NGINX ? false : "set NGINX_BIN to run" }, () => {
  it("proxies the WebSocket at / and /ws, /sync, and a node's shutdown reaches the client as 1001", async () => {
    // As deploy/nginx.conf says: the nodes trust nginx's X-Forwarded-For.
    const nodes = [
      await startServer(SERVER_BIN, ["--port", "0", "--trusted-proxies", "127.0.0.1"]),
      await startServer(SERVER_BIN, ["--port", "0", "--trusted-proxies", "127.0.0.1"]),
    ];
    const nginx = await startNginx(nodes.map((node) => node.port));
    const clients = [
      new TopGunClientModel(`ws://127.0.0.1:${nginx.port}`),
      new TopGunClientModel(`ws://127.0.0.1:${nginx.port}/ws`),
    ];
    try {
      for (const client of clients) client.connect();
      for (const client of clients) {
        await until(() => client.state === "CONNECTED", 10000, "connected through nginx");
        await until(() => client.stats.pongs >= 1, 2 * HEARTBEAT_INTERVAL_MS + 2000, "a PONG through nginx");
      }
      const sync = await httpSync(`ws://127.0.0.1:${nginx.port}`, "t", { clientId: "c", clientHlc: { millis: Date.now(), counter: 0, nodeId: "c" } });
      assert.equal(sync.status, 200);
      assert.deepEqual(sync.body, []);

      // Stop the node the first client is on; it sees 1001 and reconnects through nginx.
      const health = await Promise.all(nodes.map((node) => fetch(`http://127.0.0.1:${node.port}/health`).then((r) => r.json())));
      const busy = health.findIndex((h) => h.connections > 0);
      assert.ok(busy >= 0, "a node holds the clients");
      const onBusy = health[busy].connections;
      assert.equal((await stopServer(nodes[busy])).code, 0);
      const closedClients = () => clients.filter((client) => client.stats.closes.length > 0);
      await until(() => closedClients().length === onBusy, 5000, "the closes");
      for (const client of closedClients()) {
        assert.equal(client.stats.closes[0].code, 1001);
        assert.equal(client.stats.closes[0].reason, "server shutting down");
        await until(() => client.stats.opens === 2, 20000, "a reconnect through nginx");
        await until(() => client.state === "CONNECTED", 5000, "connected again");
      }
      for (const client of clients) assert.equal(client.stats.forcedReconnects, 0);
    } finally {
      for (const client of clients) client.close();
      nginx.child.kill("SIGQUIT");
      await withDeadline(nginx.child.exited, 10000, "nginx exit");
      for (const node of nodes) if (running.has(node.child)) await stopServer(node);
    }
  });

  it("the node sees each client's own address through nginx, so a per-address cap holds per client", async () => {
    // One node behind both upstream entries; clients on their own loopback addresses.
    const node = await startServer(SERVER_BIN, [
      "--port", "0", "--trusted-proxies", "127.0.0.1", "--max-connections-per-ip", "1",
    ]);
    const nginx = await startNginx([node.port, node.port]);
    const open = (localAddress) =>
      new Promise((resolve) => {
        const socket = new WebSocket(`ws://127.0.0.1:${nginx.port}/ws`, { localAddress });
        socket.on("open", () => resolve({ socket, status: 101 }));
        socket.on("unexpected-response", (_, response) => resolve({ socket, status: response.statusCode }));
        socket.on("error", () => {});
      });
    const sockets = [];
    try {
      const first = await open("127.0.0.2");
      sockets.push(first.socket);
      assert.equal(first.status, 101);
      const second = await open("127.0.0.2");
      sockets.push(second.socket);
      assert.equal(second.status, 429, "the same client is at its cap");
      const other = await open("127.0.0.3");
      sockets.push(other.socket);
      assert.equal(other.status, 101, "another client behind the same nginx is not");
    } finally {
      for (const socket of sockets) socket.terminate();
      nginx.child.kill("SIGQUIT");
      await withDeadline(nginx.child.exited, 10000, "nginx exit");
      await stopServer(node);
    }
  });
});

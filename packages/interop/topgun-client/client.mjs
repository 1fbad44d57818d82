// A test client that behaves, at the transport level, exactly as TopGun's TypeScript client
// (@topgunbuild/client 2.0.2 with @topgunbuild/core 2.0.0) does, as stated in
// shared/topgun-client/README.md. That client is not in the npm registry, so this model is
// built from the packages it uses: `msgpackr` (its serializer: the default pack/unpack,
// useRecords false) and, as in Node, `ws`.
//
// Modelled: the URL used verbatim; binaryType arraybuffer; MsgPack frames (text frames are
// JSON.parse'd, undecodable frames dropped); the handshake (AUTH with a token, otherwise
// DEVICE_HELLO and a 500 ms grace timer); the heartbeat (PING every 5 s from CONNECTED, a
// forced reconnect when no top-level PONG for more than 15 s); BATCH unpacking (nested too);
// reconnection (min(1000 * 2^attempts, 30000) * (0.5 + random), 5 s connect timeout, every
// close code alike); and HTTP sync (POST <url>/sync, x-msgpack, Bearer token).
import { pack, unpack } from "msgpackr";
import WebSocket from "ws";

import { unpackBatchData } from "../clients/batch.mjs";

export const HEARTBEAT_INTERVAL_MS = 5000;
export const HEARTBEAT_TIMEOUT_MS = 15000;
export const AUTH_REQUIRED_GRACE_MS = 500;
/// TopicManager's bound on publishes queued before the client is connected (drop-oldest).
export const TOPIC_QUEUE_LIMIT = 100;
const RECONNECT_DELAY_MS = 1000;
const BACKOFF_MULTIPLIER = 2;
const MAX_RECONNECT_DELAY_MS = 30000;

/// The client's serialize(): undefined fields removed (a top-level undefined becomes nil),
/// typed arrays turned into maps of index strings, then msgpackr's default pack.
export function serialize(data) {
  return pack(stripUndefined(data));
}

/// The client's deserialize(): msgpackr's default unpack, then BigInt -> Number.
export function deserialize(bytes) {
  const buffer = bytes instanceof ArrayBuffer ? new Uint8Array(bytes) : bytes;
  return coerceBigInts(unpack(buffer));
}

function stripUndefined(value) {
  if (value === undefined) return null;
  if (Array.isArray(value)) return value.map(stripUndefined);
  if (value !== null && typeof value === "object") {
    const result = {};
    for (const [k, v] of Object.entries(value)) {
      if (v !== undefined) result[k] = stripUndefined(v);
    }
    return result;
  }
  return value;
}

function coerceBigInts(value) {
  if (typeof value === "bigint") return Number(value);
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = coerceBigInts(value[i]);
    return value;
  }
  if (value !== null && typeof value === "object" && !(value instanceof Uint8Array)) {
    for (const key of Object.keys(value)) value[key] = coerceBigInts(value[key]);
  }
  return value;
}

export class TopGunClientModel {
  /// `url` is the client's serverUrl, used as given. `token`: sends AUTH instead of
  /// DEVICE_HELLO. `onMessage(message, {batched})`: every application message after routing.
  constructor(url, { token = null, onMessage = () => {}, log = () => {} } = {}) {
    this.url = url;
    this.token = token;
    this.onMessage = onMessage;
    this.log = log;
    this.state = "INITIAL";
    this.ws = null;
    this.reconnectAttempts = 0;
    this.reconnectTimer = null;
    this.graceTimer = null;
    this.heartbeatTimer = null;
    this.lastPongReceived = 0;
    this.lastRoundTripTime = null;
    this.closing = false;
    // TopicManager: the topics this client listens to (re-subscribed after every reconnect)
    // and the publishes made before it was connected.
    this.topics = new Set();
    this.pendingPublishes = [];
    this.stats = {
      opens: 0,
      failedAttempts: 0,
      forcedReconnects: 0,
      closes: [],
      pingsSent: 0,
      pongs: 0,
      pongsInBatch: 0,
      frames: 0,
      batchFrames: 0,
      messages: 0,
      connectedAt: [],
      authRequired: 0,
      // The server's Sec-WebSocket-Extensions answer on the last open (`ws` offers
      // permessage-deflate, as TopGun's client in Node does).
      extensions: null,
    };
  }

  connect() {
    this.closing = false;
    this.openSocket();
  }

  /// Stops for good: no reconnect.
  close() {
    this.closing = true;
    clearTimeout(this.reconnectTimer);
    this.stopTimers();
    if (this.ws) this.ws.close();
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(serialize(message));
      return true;
    }
    return false;
  }

  /// TopicHandle.subscribe's first listener: TOPIC_SUB now if connected, else on reaching
  /// CONNECTED (TopicManager.subscribe / resubscribeAll).
  subscribeTopic(topic) {
    if (this.topics.has(topic)) return;
    this.topics.add(topic);
    if (this.state === "CONNECTED") this.send({ type: "TOPIC_SUB", payload: { topic } });
  }

  /// The last listener gone: TOPIC_UNSUB (TopicManager.unsubscribe).
  unsubscribeTopic(topic) {
    if (!this.topics.delete(topic)) return;
    if (this.state === "CONNECTED") this.send({ type: "TOPIC_UNSUB", payload: { topic } });
  }

  /// TopicHandle.publish: TOPIC_PUB now if connected, else queued (bounded, drop-oldest) and
  /// flushed on reaching CONNECTED.
  publish(topic, data) {
    const message = { type: "TOPIC_PUB", payload: { topic, data } };
    if (this.state === "CONNECTED") {
      this.send(message);
      return;
    }
    this.pendingPublishes.push(message);
    if (this.pendingPublishes.length > TOPIC_QUEUE_LIMIT) this.pendingPublishes.shift();
  }

  openSocket() {
    let opened = false;
    let settled = false;
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.binaryType = "arraybuffer";
    this.state = "CONNECTING";
    const connectTimeout = setTimeout(() => {
      if (ws.readyState !== WebSocket.OPEN) {
        try {
          ws.close();
        } catch {
          // closing a CONNECTING socket may throw
        }
        fail("connection timeout");
      }
    }, RECONNECT_DELAY_MS * 5);
    const fail = (reason) => {
      if (settled) return;
      settled = true;
      clearTimeout(connectTimeout);
      this.stats.failedAttempts++;
      this.log(`attempt failed: ${reason}`);
      if (!this.closing) this.scheduleReconnect();
    };
    ws.on("upgrade", (response) => {
      this.stats.extensions = response.headers["sec-websocket-extensions"] ?? null;
    });
    ws.on("open", () => {
      if (settled) return;
      settled = true;
      opened = true;
      clearTimeout(connectTimeout);
      this.reconnectAttempts = 0;
      this.stats.opens++;
      this.onOpen();
    });
    ws.on("error", (err) => {
      this.log(`socket error: ${err.message}`);
      if (!opened) fail(err.message);
    });
    ws.on("close", (code, reason) => {
      if (this.ws !== ws) return; // handlers stripped by forceReconnect
      if (opened) {
        this.stats.closes.push({ code, reason: reason.toString(), at: Date.now() });
        this.log(`closed ${code} ${reason}`);
        this.stopTimers();
        this.state = "DISCONNECTED";
        if (!this.closing) this.scheduleReconnect();
      } else {
        fail(`closed before open (${code})`);
      }
    });
    ws.on("message", (data, isBinary) => {
      if (this.ws !== ws) return;
      this.stats.frames++;
      let message;
      try {
        message = isBinary ? deserialize(new Uint8Array(data)) : JSON.parse(data.toString());
      } catch (err) {
        this.log(`undecodable frame dropped: ${err.message}`);
        return;
      }
      this.handleMessage(message);
    });
  }

  scheduleReconnect() {
    clearTimeout(this.reconnectTimer);
    const base = Math.min(
      RECONNECT_DELAY_MS * BACKOFF_MULTIPLIER ** this.reconnectAttempts,
      MAX_RECONNECT_DELAY_MS,
    );
    const delay = base * (0.5 + Math.random());
    this.reconnectAttempts++;
    this.reconnectTimer = setTimeout(() => this.openSocket(), delay);
  }

  /// The heartbeat's way out: strip the old socket's handlers, close it, reconnect soon.
  forceReconnect() {
    this.stats.forcedReconnects++;
    this.stopTimers();
    const old = this.ws;
    this.ws = null;
    if (old) {
      old.removeAllListeners("message");
      old.removeAllListeners("close");
      old.on("error", () => {});
      old.close();
    }
    this.reconnectAttempts = 0;
    this.state = "DISCONNECTED";
    this.scheduleReconnect();
  }

  onOpen() {
    this.state = "AUTHENTICATING";
    if (this.token) {
      this.send({ type: "AUTH", token: this.token });
      return;
    }
    this.send({ type: "DEVICE_HELLO" });
    this.graceTimer = setTimeout(() => {
      this.graceTimer = null;
      if (this.state === "AUTHENTICATING") this.connected("grace timer");
    }, AUTH_REQUIRED_GRACE_MS);
  }

  connected(how) {
    clearTimeout(this.graceTimer);
    this.graceTimer = null;
    this.state = "CONNECTED";
    this.stats.connectedAt.push({ at: Date.now(), how });
    this.startHeartbeat();
    // handleAuthAck: topics re-subscribed, then queued publishes flushed.
    for (const topic of this.topics) this.send({ type: "TOPIC_SUB", payload: { topic } });
    for (const message of this.pendingPublishes.splice(0)) this.send(message);
  }

  startHeartbeat() {
    clearInterval(this.heartbeatTimer);
    this.lastPongReceived = Date.now();
    this.heartbeatTimer = setInterval(() => {
      if (this.send({ type: "PING", timestamp: Date.now() })) this.stats.pingsSent++;
      if (Date.now() - this.lastPongReceived > HEARTBEAT_TIMEOUT_MS) {
        this.log("heartbeat timeout: forcing a reconnect");
        this.forceReconnect();
      }
    }, HEARTBEAT_INTERVAL_MS);
  }

  stopTimers() {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    clearTimeout(this.graceTimer);
    this.graceTimer = null;
  }

  /// WebSocketManager.handleMessage: a top-level PONG feeds the heartbeat; everything goes on
  /// to the sync engine.
  handleMessage(message) {
    if (message && message.type === "PONG") {
      this.stats.pongs++;
      this.lastPongReceived = Date.now();
      this.lastRoundTripTime = Date.now() - message.timestamp;
    }
    this.handleServerMessage(message, false);
  }

  /// SyncEngine.handleServerMessage: BATCH unpacked (inner messages routed again), handshake
  /// replies, then the application's messages.
  handleServerMessage(message, batched) {
    if (!message || typeof message !== "object") return;
    if (message.type === "BATCH") {
      this.stats.batchFrames++;
      for (const inner of unpackBatchData(message.data)) {
        let decoded;
        try {
          decoded = deserialize(inner);
        } catch (err) {
          this.log(`undecodable batched message dropped: ${err.message}`);
          continue;
        }
        this.handleServerMessage(decoded, true);
      }
      return;
    }
    if (message.type === "PONG") {
      // The router treats it as a no-op: inside a BATCH the heartbeat never sees it.
      if (batched) this.stats.pongsInBatch++;
      return;
    }
    this.stats.messages++;
    if (this.state === "AUTHENTICATING") {
      if (message.type === "AUTH_REQUIRED") {
        clearTimeout(this.graceTimer);
        this.stats.authRequired++;
        if (!this.token) return; // parks in AUTHENTICATING
      } else if (message.type === "AUTH_ACK" || message.type === "DEVICE_ACK") {
        this.connected(message.type);
      } else if (message.type !== "AUTH_FAIL") {
        this.connected(`first message ${message.type}`);
      }
    }
    this.onMessage(message, { batched });
  }
}

/// HttpSyncProvider's request: POST <url without trailing slash>/sync with the client's
/// headers and body; resolves to the decoded response.
export async function httpSync(serverUrl, token, body) {
  const base = serverUrl.replace(/^ws/, "http").replace(/\/$/, "");
  const response = await fetch(`${base}/sync`, {
    method: "POST",
    headers: { "Content-Type": "application/x-msgpack", Authorization: `Bearer ${token ?? ""}` },
    body: serialize(body),
    signal: AbortSignal.timeout(30000),
  });
  const bytes = new Uint8Array(await response.arrayBuffer());
  return { status: response.status, headers: response.headers, body: deserialize(bytes) };
}

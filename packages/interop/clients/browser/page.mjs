// Runs in Chromium, served from a different origin than the server: the scripted WebSocket
// session, then a cross-origin POST /sync (a real CORS preflight), then waits for the close.
import { encode, decode } from "@msgpack/msgpack";
import { scriptedSession } from "../batch.mjs";

const server = new URL(location.href).searchParams.get("server");
const log = (line) => (document.getElementById("log").textContent += line + "\n");

async function run() {
  const ws = new WebSocket(server.replace(/^http/, "ws") + "/ws");
  ws.binaryType = "arraybuffer";
  const frames = [];
  const waiters = [];
  ws.onmessage = (event) => {
    if (typeof event.data === "string") throw new Error("unexpected text frame");
    const frame = new Uint8Array(event.data);
    const waiter = waiters.shift();
    if (waiter) waiter(frame);
    else frames.push(frame);
  };
  window.__closed = new Promise((resolve) => (ws.onclose = (e) => resolve({ code: e.code, reason: e.reason })));
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("websocket failed"));
  });
  const nextFrame = () => (frames.length ? Promise.resolve(frames.shift()) : new Promise((r) => waiters.push(r)));
  const session = await scriptedSession((b) => ws.send(b), nextFrame, { encode, decode });

  const body = encode({ type: "SYNC_INIT", mapName: "todos" });
  const response = await fetch(server + "/sync", {
    method: "POST",
    headers: { "content-type": "application/msgpack" },
    body,
  });
  if (response.status !== 200) throw new Error(`POST /sync answered ${response.status}`);
  if (!response.headers.get("x-request-id")) throw new Error("x-request-id not exposed to the page");
  const echoed = decode(new Uint8Array(await response.arrayBuffer()));
  if (echoed.type !== "SYNC_INIT" || echoed.mapName !== "todos") throw new Error("bad /sync answer");
  return { ...session, sync: response.headers.get("content-type"), extensions: ws.extensions || "none" };
}

window.__session = run().then(
  (summary) => {
    log("READY " + JSON.stringify(summary));
    return { ok: true, summary };
  },
  (error) => {
    log("ERROR " + error);
    return { ok: false, error: String(error) };
  },
);

// Node.js `ws` client: scripted session, then waits for the server's close.
// Usage: node node_client.mjs ws://127.0.0.1:8080/ws
import WebSocket from "ws";
import { encode, decode } from "@msgpack/msgpack";
import { scriptedSession } from "./batch.mjs";

const url = process.argv[2];
const ws = new WebSocket(url);
ws.binaryType = "nodebuffer";
const frames = [];
const waiters = [];
ws.on("message", (data, isBinary) => {
  if (!isBinary) throw new Error("unexpected text frame");
  const frame = new Uint8Array(data);
  const waiter = waiters.shift();
  if (waiter) waiter(frame);
  else frames.push(frame);
});
const nextFrame = () => (frames.length ? Promise.resolve(frames.shift()) : new Promise((r) => waiters.push(r)));
// The server's answer as sent (`ws.extensions` names only the extension).
ws.once("upgrade", (response) => console.log(`EXTENSIONS ${response.headers["sec-websocket-extensions"] ?? "none"}`));
const closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
await new Promise((resolve, reject) => {
  ws.once("open", resolve);
  ws.once("error", reject);
});
const summary = await scriptedSession((b) => ws.send(b, { binary: true }), nextFrame, { encode, decode });
console.log(`SESSION ${JSON.stringify(summary)}`);
console.log("READY");
const { code, reason } = await closed;
console.log(`CLOSE ${code} ${reason}`);
process.exit(code === 1001 && reason === "server shutting down" ? 0 : 1);

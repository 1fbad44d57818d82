// The Bun peer of `bench-server`: Bun's WebSocket server is uWebSockets (C++). The same
// behaviour as `bench-server` and `../node/ws-server.mjs`: it holds connections at `/ws`,
// echoes every binary message, and on `{type: "BROADCAST", count, size, interval_ms}`
// (MsgPack) sends `count` messages of `size` bytes to every connection (the control connection
// too), each starting with its send time (nanoseconds since the epoch, u64 LE) and sequence
// number (u32 LE). It broadcasts the way Bun's documentation recommends, through its pub/sub
// (`server.publish`, which writes each subscriber's bytes once). `GET /health` answers
// `{"connections": n}`; SIGTERM closes every connection with 1001 and exits once they are gone.
// Bun's defaults are kept (no permessage-deflate).
//
//   bun bun-server.mjs [--port N]      prints `LISTENING <port>` once it accepts connections

import { unpack } from 'msgpackr';

const portArg = process.argv.indexOf('--port');
const port = portArg >= 0 ? Number(process.argv[portArg + 1]) : 0;
const TOPIC = 'all';
let connections = 0;

// Wall-clock nanoseconds, as the Rust client reads them. Bun's high-resolution clock counts from
// the process start, so it is anchored once to the epoch at a millisecond boundary of Date.now()
// (within microseconds), and read from then on without Date's millisecond steps.
const anchor = (() => {
  const start = Date.now();
  let now = start;
  while (now === start) now = Date.now();
  return BigInt(now) * 1_000_000n - BigInt(Bun.nanoseconds());
})();
const nowNanos = () => anchor + BigInt(Bun.nanoseconds());

function broadcast({ count, size, interval_ms: intervalMs }) {
  let seq = 0;
  const fire = () => {
    const payload = Buffer.alloc(Math.max(size, 12));
    payload.writeBigUInt64LE(nowNanos(), 0);
    payload.writeUInt32LE(seq, 8);
    server.publish(TOPIC, payload);
    seq += 1;
    if (seq < count) {
      if (intervalMs > 0) setTimeout(fire, intervalMs);
      else setImmediate(fire);
    } else {
      console.error(`broadcast done: ${count} messages`);
    }
  };
  fire();
}

const open = new Set();

const server = Bun.serve({
  hostname: '127.0.0.1',
  port,
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === '/ws' && server.upgrade(req)) return undefined;
    if (req.method === 'GET' && url.pathname === '/health') {
      return Response.json({ state: 'ready', connections });
    }
    return new Response('not found\n', { status: 404 });
  },
  websocket: {
    open(ws) {
      connections += 1;
      open.add(ws);
      ws.subscribe(TOPIC);
    },
    message(ws, data) {
      if (typeof data === 'string') return;
      let request;
      try {
        request = unpack(data);
      } catch {
        request = undefined;
      }
      if (request && request.type === 'BROADCAST') broadcast(request);
      else ws.send(data);
    },
    close(ws) {
      connections -= 1;
      open.delete(ws);
    },
  },
});

process.on('SIGTERM', () => {
  for (const ws of open) ws.close(1001, 'server shutting down');
  const exitWhenEmpty = () => {
    if (connections === 0) {
      server.stop(true);
      process.exit(0);
    } else setTimeout(exitWhenEmpty, 5);
  };
  exitWhenEmpty();
});

console.log(`LISTENING ${server.port}`);

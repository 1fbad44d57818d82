// The Node.js `ws` peer of `bench-server`: the same behaviour, so the harness can measure both
// in one run. It holds connections at `/ws`, echoes every binary message, and on
// `{type: "BROADCAST", count, size, interval_ms}` (MsgPack) sends `count` messages of `size`
// bytes to every connection (the control connection too, as the transport does), each
// starting with its send time (nanoseconds since the epoch, u64 LE) and sequence number
// (u32 LE), the way `ws` users broadcast: one `send` per client. `GET /health` answers
// `{"connections": n}`; SIGTERM closes every connection with 1001 and exits once they are
// gone. `ws`'s defaults are kept (a `ws` server negotiates no permessage-deflate unless asked).
//
//   node ws-server.mjs [--port N]      prints `LISTENING <port>` once it accepts connections

import http from 'node:http';
import { unpack } from 'msgpackr';
import { WebSocketServer } from 'ws';

const portArg = process.argv.indexOf('--port');
const port = portArg >= 0 ? Number(process.argv[portArg + 1]) : 0;

const server = http.createServer((req, res) => {
  // With a length, not chunked: the harness reads these bodies with a raw HTTP/1.1 request.
  const answer = (status, type, body) => {
    res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body) });
    res.end(body);
  };
  if (req.method === 'GET' && req.url === '/health') {
    answer(200, 'application/json', JSON.stringify({ state: 'ready', connections: wss.clients.size }));
  } else {
    answer(404, 'text/plain', 'not found\n');
  }
});
const wss = new WebSocketServer({ server, path: '/ws' });

/** Wall-clock nanoseconds, as the Rust client reads them. */
function nowNanos() {
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));
}

function broadcast({ count, size, interval_ms: intervalMs }) {
  let seq = 0;
  const fire = () => {
    const payload = Buffer.alloc(Math.max(size, 12));
    payload.writeBigUInt64LE(nowNanos(), 0);
    payload.writeUInt32LE(seq, 8);
    for (const client of wss.clients) {
      if (client.readyState === 1) client.send(payload);
    }
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

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (!isBinary) return;
    let request;
    try {
      request = unpack(data);
    } catch {
      request = undefined;
    }
    if (request && request.type === 'BROADCAST') broadcast(request);
    else ws.send(data);
  });
  ws.on('error', () => {});
});

process.on('SIGTERM', () => {
  server.close();
  for (const client of wss.clients) client.close(1001, 'server shutting down');
  const exitWhenEmpty = () => {
    if (wss.clients.size === 0) process.exit(0);
    else setTimeout(exitWhenEmpty, 5);
  };
  exitWhenEmpty();
});

server.listen(port, '127.0.0.1', () => {
  console.log(`LISTENING ${server.address().port}`);
});

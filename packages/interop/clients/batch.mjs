// Unpacks a frame from the TopGun server the way TopGun's TypeScript client does: a MsgPack map
// { type: "BATCH", count, data } whose data is a u32 little-endian count followed, per message,
// by a u32 little-endian length and the message bytes. Any other frame is one message.
// Shared by the Node client and the browser page.
import { decode } from "@msgpack/msgpack";

/// The messages of a BATCH's `data`: a u32 LE count, then per message a u32 LE length and the
/// message bytes (slices of `data`). Throws on trailing bytes.
export function unpackBatchData(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const count = view.getUint32(0, true);
  const messages = [];
  let offset = 4;
  for (let i = 0; i < count; i++) {
    const length = view.getUint32(offset, true);
    offset += 4;
    messages.push(data.subarray(offset, offset + length));
    offset += length;
  }
  if (offset !== data.byteLength) throw new Error("trailing bytes in BATCH");
  return messages;
}

export function unpackFrame(frame) {
  const bytes = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
  let envelope;
  try {
    envelope = decode(bytes);
  } catch {
    return { batched: false, messages: [bytes] };
  }
  if (!envelope || envelope.type !== "BATCH") {
    return { batched: false, messages: [bytes] };
  }
  const messages = unpackBatchData(envelope.data);
  if (messages.length !== envelope.count) {
    throw new Error(`BATCH count ${envelope.count} but data holds ${messages.length}`);
  }
  return { batched: true, messages };
}

// The scripted session every client runs: echo three messages, then ask for a burst of `burst`
// items and check they arrive complete, in order, at least partly batched.
// `send(bytes)` sends a binary frame; `nextFrame()` resolves to the next binary frame.
export async function scriptedSession(send, nextFrame, { encode, decode: decodeMsg }, burst = 50) {
  const pending = [];
  const nextMessage = async () => {
    while (pending.length === 0) {
      const { batched, messages } = unpackFrame(await nextFrame());
      for (const m of messages) pending.push({ batched, message: m });
    }
    return pending.shift();
  };
  for (let n = 0; n < 3; n++) {
    send(encode({ type: "PING", n }));
    const { message } = await nextMessage();
    const echoed = decodeMsg(message);
    if (echoed.type !== "PING" || echoed.n !== n) throw new Error(`bad echo ${JSON.stringify(echoed)}`);
  }
  send(encode({ type: "BURST", count: burst }));
  let batchedSeen = 0;
  for (let seq = 0; seq < burst; seq++) {
    const { batched, message } = await nextMessage();
    const item = decodeMsg(message);
    if (item.type !== "ITEM" || item.seq !== seq) throw new Error(`item ${seq} is ${JSON.stringify(item)}`);
    if (batched) batchedSeen++;
  }
  if (batchedSeen === 0) throw new Error("the burst arrived without any BATCH frame");
  return { echoed: 3, burst, batched: batchedSeen };
}

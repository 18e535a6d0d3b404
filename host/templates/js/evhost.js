// evhost's side of the plugin contract (evhost:plugin@0.2.0) for JavaScript: the event
// batch decoder and the error a handler throws. Written by `evhost plugin new`; keep it.

const utf8 = new TextDecoder();

/**
 * The events of a batch, in log order, decoded from the buffer the host hands `handle`
 * (types.event-batch in wit/plugin.wit): each with position, version, timestampMicros,
 * id, type, stream, source, payload (parsed JSON) and metadata (an object of strings).
 */
export function* events(batch) {
  const view = new DataView(batch.buffer, batch.byteOffset, batch.byteLength);
  const count = view.getUint32(0, true);
  let at = 4;
  const text = (n) => {
    const s = utf8.decode(batch.subarray(at, at + n));
    at += n;
    return s;
  };
  for (let i = 0; i < count; i++) {
    const position = Number(view.getBigUint64(at, true));
    const version = Number(view.getBigUint64(at + 8, true));
    const timestampMicros = Number(view.getBigInt64(at + 16, true));
    const lens = [0, 1, 2, 3, 4, 5].map((j) => view.getUint32(at + 24 + 4 * j, true));
    at += 48;
    const [id, type, stream, source, payload] = lens.slice(0, 5).map(text);
    const metadata = {};
    for (let j = 0; j < lens[5]; j++) {
      const nk = view.getUint32(at, true);
      const nv = view.getUint32(at + 4, true);
      at += 8;
      const key = text(nk);
      metadata[key] = text(nv);
    }
    yield { position, version, timestampMicros, id, type, stream, source,
            payload: JSON.parse(payload), metadata };
  }
}

/** What to throw when an event cannot be handled: the host dead-letters it with `message`. */
export function invalidInput(message) {
  return { tag: 'invalid-input', val: message };
}

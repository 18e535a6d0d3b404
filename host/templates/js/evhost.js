// evhost's side of the plugin contract (evhost:plugin@0.2.0) for JavaScript: the event
// batch decoder and the error a handler throws. Written by `evhost plugin new`; keep it.

const utf8 = new TextDecoder();

/** One event of a batch; its texts are decoded, and its payload parsed, when first read. */
class Event {
  #batch;
  #spans;
  #parsed;
  constructor(batch, position, version, timestampMicros, spans, metadata) {
    this.position = position;
    this.version = version;
    this.timestampMicros = timestampMicros;
    this.metadata = metadata;
    this.#batch = batch;
    this.#spans = spans;
  }
  #text(i) {
    const s = this.#spans;
    return utf8.decode(this.#batch.subarray(s[2 * i], s[2 * i + 1]));
  }
  get id() { return this.#text(0); }
  get type() { return this.#text(1); }
  get stream() { return this.#text(2); }
  get source() { return this.#text(3); }
  /** The payload, parsed from its JSON text (once). */
  get payload() {
    if (this.#parsed === undefined) this.#parsed = JSON.parse(this.#text(4));
    return this.#parsed;
  }
}

/** The little-endian u64 at `at`, as a number. */
function u64(view, at) {
  return view.getUint32(at + 4, true) * 4294967296 + view.getUint32(at, true);
}

/**
 * The events of a batch, in log order, from the buffer the host hands `handle`
 * (types.event-batch in wit/plugin.wit): each with position, version, timestampMicros,
 * id, type, stream, source, payload (parsed JSON) and metadata (an object of strings).
 */
export function* events(batch) {
  const view = new DataView(batch.buffer, batch.byteOffset, batch.byteLength);
  const count = view.getUint32(0, true);
  let at = 4;
  for (let i = 0; i < count; i++) {
    // 64-bit fields read as two halves: BigInt is slow in the engine, and positions,
    // versions and timestamps in microseconds fit a double exactly until 2^53.
    const position = u64(view, at);
    const version = u64(view, at + 8);
    const timestampMicros = view.getInt32(at + 20, true) * 4294967296 + view.getUint32(at + 16, true);
    const metaCount = view.getUint32(at + 44, true);
    const spans = new Array(10);
    let from = at + 48;
    for (let j = 0; j < 5; j++) {
      const end = from + view.getUint32(at + 24 + 4 * j, true);
      spans[2 * j] = from;
      spans[2 * j + 1] = end;
      from = end;
    }
    at = from;
    let metadata = {};
    for (let j = 0; j < metaCount; j++) {
      const nk = view.getUint32(at, true);
      const nv = view.getUint32(at + 4, true);
      at += 8;
      const key = utf8.decode(batch.subarray(at, at + nk));
      at += nk;
      metadata[key] = utf8.decode(batch.subarray(at, at + nv));
      at += nv;
    }
    if (at > batch.byteLength) throw new Error('the event batch is shorter than its lengths say');
    yield new Event(batch, position, version, timestampMicros, spans, metadata);
  }
}

/** What to throw when an event cannot be handled: the host dead-letters it with `message`. */
export function invalidInput(message) {
  return { tag: 'invalid-input', val: message };
}

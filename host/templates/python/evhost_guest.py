"""evhost's side of the plugin contract (evhost:plugin@0.2.0) for Python: the event batch
decoder and the error a handler raises. Written by `evhost plugin new`; keep it."""

import json
import struct

from componentize_py_types import Err
from wit_world.imports.types import Error_InvalidInput

_HEADER = struct.Struct("<QQqIIIIII")
_PAIR = struct.Struct("<II")


def events(batch: bytes):
    """The events of a batch, in log order, decoded from the buffer the host hands
    `handle` (types.event-batch in wit/plugin.wit): dicts with position, version,
    timestamp_micros, id, type, stream, source, payload (parsed JSON) and metadata."""
    data = memoryview(batch)
    (count,) = struct.unpack_from("<I", data, 0)
    at = 4
    for _ in range(count):
        position, version, micros, *lens, n_meta = _HEADER.unpack_from(data, at)
        at += _HEADER.size
        texts = []
        for n in lens:
            texts.append(str(data[at:at + n], "utf-8"))
            at += n
        metadata = {}
        for _ in range(n_meta):
            nk, nv = _PAIR.unpack_from(data, at)
            at += _PAIR.size
            key = str(data[at:at + nk], "utf-8")
            at += nk
            metadata[key] = str(data[at:at + nv], "utf-8")
            at += nv
        event_id, event_type, stream, source, payload = texts
        yield {"position": position, "version": version, "timestamp_micros": micros,
               "id": event_id, "type": event_type, "stream": stream, "source": source,
               "payload": json.loads(payload), "metadata": metadata}


def invalid_input(message: str) -> Err:
    """What to raise when an event cannot be handled: the host dead-letters it with
    `message`."""
    return Err(Error_InvalidInput(message))

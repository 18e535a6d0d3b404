"""evhost's side of the plugin contract (evhost:plugin@0.2.0) for Python: the event batch
decoder and the error a handler raises. Written by `evhost plugin new`; keep it."""

import json
import struct

from componentize_py_types import Err
from wit_world.imports.types import Error_InvalidInput

_HEADER = struct.Struct("<QQqIIIIII")
_PAIR = struct.Struct("<II")


class Event:
    """One event of a batch; its texts are decoded, and its payload parsed, when first
    read."""

    __slots__ = ("position", "version", "timestamp_micros", "metadata", "_data", "_spans",
                 "_payload")

    def __init__(self, data, position, version, micros, spans, metadata):
        self.position = position
        self.version = version
        self.timestamp_micros = micros
        self.metadata = metadata
        self._data = data
        self._spans = spans
        self._payload = _UNSET

    def _text(self, i: int) -> str:
        return str(self._data[self._spans[2 * i]:self._spans[2 * i + 1]], "utf-8")

    @property
    def id(self) -> str:
        return self._text(0)

    @property
    def type(self) -> str:
        return self._text(1)

    @property
    def stream(self) -> str:
        return self._text(2)

    @property
    def source(self) -> str:
        return self._text(3)

    @property
    def payload(self):
        """The payload, parsed from its JSON text (once)."""
        if self._payload is _UNSET:
            self._payload = json.loads(self._text(4))
        return self._payload


_UNSET = object()


def events(batch: bytes):
    """The events of a batch, in log order, from the buffer the host hands `handle`
    (types.event-batch in wit/plugin.wit): each with position, version, timestamp_micros,
    id, type, stream, source, payload (parsed JSON) and metadata (a dict of strings)."""
    data = memoryview(batch)
    (count,) = struct.unpack_from("<I", data, 0)
    at = 4
    for _ in range(count):
        position, version, micros, *lens, n_meta = _HEADER.unpack_from(data, at)
        at += _HEADER.size
        spans = []
        for n in lens:
            spans.append(at)
            at += n
            spans.append(at)
        metadata = {}
        for _ in range(n_meta):
            nk, nv = _PAIR.unpack_from(data, at)
            at += _PAIR.size
            key = str(data[at:at + nk], "utf-8")
            at += nk
            metadata[key] = str(data[at:at + nv], "utf-8")
            at += nv
        if at > len(data):
            raise ValueError("the event batch is shorter than its lengths say")
        yield Event(data, position, version, micros, spans, metadata)


def invalid_input(message: str) -> Err:
    """What to raise when an event cannot be handled: the host dead-letters it with
    `message`."""
    return Err(Error_InvalidInput(message))

"""{{name}}: an evhost extractor. For every `order.placed` event of 100 or more, such as
{"customer": "c-1", "total": 250}, it appends an `order.flagged` event to the stream
`flagged-orders`, pointing back at the order.

Build with `evhost plugin build`, run it over fixtures/ with `evhost plugin test`, and load
it into a running host with `evhost plugin deploy --wait`."""

import json

from wit_world import exports
from wit_world.imports.types import NewEvent

from evhost_guest import events, invalid_input

LARGE = 100


class ExtractorHandler(exports.ExtractorHandler):
    def handle(self, batch: bytes) -> list:
        """One list per input event: what it derives. The host appends them exactly once,
        with causation_id set to the input event's id."""
        out = []
        for event in events(batch):
            payload = event.payload if isinstance(event.payload, dict) else {}
            customer, total = payload.get("customer"), payload.get("total")
            if (not isinstance(customer, str) or isinstance(total, bool)
                    or not isinstance(total, (int, float))):
                raise invalid_input(f"event {event.id} needs a customer and a total")
            derived = []
            if total >= LARGE:
                payload = {"order_stream": event.stream, "customer": customer, "total": total}
                derived.append(NewEvent("order.flagged", "flagged-orders", json.dumps(payload), []))
            out.append(derived)
        return out

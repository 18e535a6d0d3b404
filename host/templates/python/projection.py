"""{{name}}: an evhost projection. Per customer, it keeps how many orders they placed and
what they spent, from `order.placed` events such as {"customer": "c-1", "total": 12.5}.

Build with `evhost plugin build`, run it over fixtures/ with `evhost plugin test`, and load
it into a running host with `evhost plugin deploy --wait`."""

import json

from wit_world import exports
from wit_world.imports import state

from evhost_guest import events, invalid_input


class ProjectionHandler(exports.ProjectionHandler):
    def handle(self, batch: bytes) -> None:
        """A batch is all or nothing: raise, and none of its writes are kept."""
        changed = {}
        for event in events(batch):
            payload = event.payload if isinstance(event.payload, dict) else {}
            customer, total = payload.get("customer"), payload.get("total", 0)
            if not isinstance(customer, str):
                raise invalid_input(f"event {event.id} has no customer in its payload")
            if isinstance(total, bool) or not isinstance(total, (int, float)):
                raise invalid_input(f"event {event.id} has a total that is not a number")
            if customer not in changed:
                stored = state.get(customer)
                changed[customer] = json.loads(stored) if stored else {"orders": 0, "spent": 0}
            s = changed[customer]
            s["orders"] += 1
            s["spent"] += total
        state.set_many([(k, json.dumps(v)) for k, v in changed.items()])

    def query(self, request: str) -> str:
        """POST /v1/projections/{{name}}/query: the request is a customer's id."""
        return state.get(request) or "null"

"""type-counter in Python: counts events by type; the state under key T is the number of T
events seen, as plugins/type-counter keeps it."""

from wit_world import exports
from wit_world.imports import state

from evhost_guest import events


class ProjectionHandler(exports.ProjectionHandler):
    def handle(self, batch: bytes) -> None:
        counts = {}
        for event in events(batch):
            t = event.type
            if t not in counts:
                counts[t] = int(state.get(t) or 0)
            counts[t] += 1
        state.set_many([(t, str(n)) for t, n in counts.items()])

    def query(self, request: str) -> str:
        return state.get(request) or "null"

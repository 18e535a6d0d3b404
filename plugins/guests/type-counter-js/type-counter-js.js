// type-counter in JavaScript: counts events by type; the state under key T is the number
// of T events seen, as plugins/type-counter keeps it.
import { get, setMany } from 'evhost:plugin/state@0.2.0';
import { events } from './evhost.js';

export const projectionHandler = {
  handle(batch) {
    const counts = new Map();
    for (const event of events(batch)) {
      if (!counts.has(event.type)) counts.set(event.type, Number(get(event.type) ?? 0));
      counts.set(event.type, counts.get(event.type) + 1);
    }
    setMany([...counts].map(([type, n]) => [type, String(n)]));
  },
  query(request) {
    return get(request) ?? 'null';
  },
};

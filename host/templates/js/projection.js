// {{name}}: an evhost projection. Per customer, it keeps how many orders they placed and
// what they spent, from `order.placed` events such as {"customer": "c-1", "total": 12.5}.
//
// Build with `evhost plugin build`, run it over fixtures/ with `evhost plugin test`, and
// load it into a running host with `evhost plugin deploy --wait`.
import { get, setMany } from 'evhost:plugin/state@0.2.0';
import { events, invalidInput } from './evhost.js';

export const projectionHandler = {
  // A batch is all or nothing: throw, and none of its writes are kept.
  handle(batch) {
    const changed = new Map();
    for (const event of events(batch)) {
      const { customer, total = 0 } = event.payload ?? {};
      if (typeof customer !== 'string') {
        throw invalidInput(`event ${event.id} has no customer in its payload`);
      }
      if (typeof total !== 'number') {
        throw invalidInput(`event ${event.id} has a total that is not a number`);
      }
      if (!changed.has(customer)) {
        const stored = get(customer);
        changed.set(customer, stored ? JSON.parse(stored) : { orders: 0, spent: 0 });
      }
      const state = changed.get(customer);
      state.orders += 1;
      state.spent += total;
    }
    setMany([...changed].map(([key, state]) => [key, JSON.stringify(state)]));
  },
  // POST /v1/projections/{{name}}/query: the request is a customer's id.
  query(request) {
    return get(request) ?? 'null';
  },
};

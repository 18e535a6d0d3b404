// {{name}}: an evhost extractor. For every `order.placed` event of 100 or more, such as
// {"customer": "c-1", "total": 250}, it appends an `order.flagged` event to the stream
// `flagged-orders`, pointing back at the order.
//
// Build with `evhost plugin build`, run it over fixtures/ with `evhost plugin test`, and
// load it into a running host with `evhost plugin deploy --wait`.
import { events, invalidInput } from './evhost.js';

const LARGE = 100;

export const extractorHandler = {
  // One list per input event: what it derives. The host appends them exactly once, with
  // causation_id set to the input event's id.
  handle(batch) {
    const out = [];
    for (const event of events(batch)) {
      const { customer, total } = event.payload ?? {};
      if (typeof customer !== 'string' || typeof total !== 'number') {
        throw invalidInput(`event ${event.id} needs a customer and a total`);
      }
      const derived = [];
      if (total >= LARGE) {
        derived.push({
          eventType: 'order.flagged',
          stream: 'flagged-orders',
          payload: JSON.stringify({ order_stream: event.stream, customer, total }),
          metadata: [],
        });
      }
      out.push(derived);
    }
    return out;
  },
};

// {{name}}: an evhost tool worker. An invocation {"text": "one two three"} returns
// {"words": 3, "characters": 13}. It runs with no ambient authority: no files, no network,
// no clock unless its manifest asks and the operator grants.
//
// Build with `evhost plugin build`, run it over fixtures/ with `evhost plugin test`, and
// load it into a running host with `evhost plugin deploy --wait`.
import { invalidInput } from './evhost.js';

export const toolHandler = {
  describe() {
    return {
      name: '{{name}}',
      description: 'Counts the words and characters of a text.',
      inputSchema: JSON.stringify({
        $schema: 'https://json-schema.org/draft/2020-12/schema',
        type: 'object',
        properties: { text: { type: 'string', maxLength: 100000 } },
        required: ['text'],
        additionalProperties: false,
      }),
    };
  },
  invoke(input) {
    const { text } = JSON.parse(input) ?? {};
    if (typeof text !== 'string') throw invalidInput('the input needs a text');
    const words = text.split(/\s+/).filter((w) => w.length > 0).length;
    return JSON.stringify({ words, characters: [...text].length });
  },
};

"""{{name}}: an evhost tool worker. An invocation {"text": "one two three"} returns
{"words": 3, "characters": 13}. It runs with no ambient authority: no files, no network, no
clock unless its manifest asks and the operator grants.

Build with `evhost plugin build`, run it over fixtures/ with `evhost plugin test`, and load
it into a running host with `evhost plugin deploy --wait`."""

import json

from wit_world import exports
from wit_world.imports.types import ToolInfo

from evhost_guest import invalid_input

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"text": {"type": "string", "maxLength": 100000}},
    "required": ["text"],
    "additionalProperties": False,
}


class ToolHandler(exports.ToolHandler):
    def describe(self) -> ToolInfo:
        return ToolInfo("{{name}}", "Counts the words and characters of a text.", json.dumps(SCHEMA))

    def invoke(self, input: str) -> str:
        parsed = json.loads(input)
        text = parsed.get("text") if isinstance(parsed, dict) else None
        if not isinstance(text, str):
            raise invalid_input("the input needs a text")
        return json.dumps({"words": len(text.split()), "characters": len(text)})

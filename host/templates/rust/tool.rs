//! {{name}}: an evhost tool worker. An invocation `{"text": "one two three"}` returns
//! `{"words": 3, "characters": 13}`. It runs with no ambient authority: no files, no
//! network, no clock unless its manifest asks and the operator grants.
//!
//! Build with `evhost plugin build`, run it over `fixtures/` with `evhost plugin test`,
//! and load it into a running host with `evhost plugin deploy --wait`.

use evhost_sdk::{Error, Tool};
use serde::{Deserialize, Serialize};

/// The input of an invocation.
#[derive(Deserialize)]
pub struct Input {
    pub text: String,
}

/// The output of an invocation.
#[derive(Debug, Serialize, PartialEq)]
pub struct Output {
    pub words: usize,
    pub characters: usize,
}

pub struct Plugin;

impl Tool for Plugin {
    const NAME: &'static str = "{{name}}";
    const DESCRIPTION: &'static str = "Counts the words and characters of a text.";
    type Input = Input;
    type Output = Output;

    fn input_schema() -> serde_json::Value {
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 100000}},
            "required": ["text"],
            "additionalProperties": false
        })
    }

    fn invoke(input: Input) -> Result<Output, Error> {
        Ok(Output {
            words: input.text.split_whitespace().count(),
            characters: input.text.chars().count(),
        })
    }
}

evhost_sdk::export_tool!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_and_characters() {
        let out = Plugin::invoke(Input { text: "one two three".into() }).unwrap();
        assert_eq!(out, Output { words: 3, characters: 13 });
    }
}

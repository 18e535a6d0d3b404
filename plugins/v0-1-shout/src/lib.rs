//! v0-1-shout (tests only): a tool built against `evhost:plugin@0.1.0` that upper-cases
//! its input's `text`.

use evhost_sdk_v0_1::{Error, Tool};
use serde::{Deserialize, Serialize};

/// Upper-cases text.
pub struct Shout;

/// The input.
#[derive(Deserialize)]
pub struct Input {
    text: String,
}

/// The output.
#[derive(Serialize)]
pub struct Output {
    text: String,
}

impl Tool for Shout {
    const NAME: &'static str = "v0-1-shout";
    const DESCRIPTION: &'static str = "Upper-cases text (a 0.1.0 test guest).";
    type Input = Input;
    type Output = Output;

    fn input_schema() -> serde_json::Value {
        serde_json::json!({"type": "object", "required": ["text"],
                           "properties": {"text": {"type": "string"}}})
    }

    fn invoke(input: Input) -> Result<Output, Error> {
        Ok(Output {
            text: input.text.to_uppercase(),
        })
    }
}

evhost_sdk_v0_1::export_tool!(Shout);

//! The tool model: a described, typed invocation.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::Error;

/// A tool worker: the host routes `tool.invocation.requested` events naming [`Tool::NAME`]
/// to it, checks their input against [`Tool::input_schema`], and appends the result.
pub trait Tool {
    /// The name requests use in their `tool` field.
    const NAME: &'static str;
    /// What the tool does, for people and planners.
    const DESCRIPTION: &'static str;
    /// The input, parsed from the request's `input`.
    type Input: DeserializeOwned;
    /// The output, recorded in `tool.invocation.completed`.
    type Output: Serialize;

    /// JSON Schema (2020-12) of the input; the host refuses non-conforming input without
    /// running the tool.
    fn input_schema() -> serde_json::Value;

    /// Runs one invocation.
    fn invoke(input: Self::Input) -> Result<Self::Output, Error>;
}

/// Runs `T` on JSON input text, as the host's call does: for native tests.
pub fn invoke_json<T: Tool>(input: &str) -> Result<String, Error> {
    let input: T::Input = serde_json::from_str(input)
        .map_err(|e| Error::InvalidInput(format!("input of tool {} does not fit: {e}", T::NAME)))?;
    let output = T::invoke(input)?;
    serde_json::to_string(&output).map_err(|e| {
        Error::Failed(format!(
            "output of tool {} does not serialize: {e}",
            T::NAME
        ))
    })
}

#[doc(hidden)]
pub mod wasm {
    use super::{Tool, invoke_json};
    use crate::tool_bindings::evhost::plugin::types as wit;

    pub fn wasm_describe<T: Tool>() -> wit::ToolInfo {
        wit::ToolInfo {
            name: T::NAME.to_owned(),
            description: T::DESCRIPTION.to_owned(),
            input_schema: T::input_schema().to_string(),
        }
    }

    pub fn wasm_invoke<T: Tool>(input: String) -> Result<String, wit::Error> {
        invoke_json::<T>(&input).map_err(|e| match e {
            crate::Error::InvalidInput(m) => wit::Error::InvalidInput(m),
            crate::Error::Failed(m) => wit::Error::Failed(m),
        })
    }
}

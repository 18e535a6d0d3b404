//! The tool model: a described, typed invocation.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::Error;

/// A tool worker: runs invocations requested by `tool.invocation.requested` events, with
/// only the capabilities its manifest asks for and the operator grants.
pub trait Tool {
    /// The name requests use; must equal the manifest's `name`.
    const NAME: &'static str;
    /// What it does, for `describe`.
    const DESCRIPTION: &'static str;
    /// The invocation's input.
    type Input: DeserializeOwned;
    /// Its result.
    type Output: Serialize;

    /// JSON Schema (2020-12) of [`Tool::Input`].
    fn input_schema() -> serde_json::Value;

    /// Runs one invocation.
    fn invoke(input: Self::Input) -> Result<Self::Output, Error>;
}

/// Runs `T` on `input` (JSON text), returning its output as JSON text.
pub(crate) fn invoke_json<T: Tool>(input: &str) -> Result<String, Error> {
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

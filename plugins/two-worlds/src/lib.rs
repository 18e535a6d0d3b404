//! two-worlds (tests only): a component that exports both a projection's and a tool's
//! interface of `evhost:plugin@0.2.0`; the host refuses it, since a plugin implements
//! exactly one world.

wit_bindgen::generate!({
    path: "../../plugin-sdk/wit",
    inline: "package test:two;
             world two {
                 include evhost:plugin/projection@0.2.0;
                 include evhost:plugin/tool@0.2.0;
             }",
    world: "test:two/two",
    generate_all,
});

use evhost::plugin::types::{Error, ToolInfo};
use exports::evhost::plugin::{projection_handler, tool_handler};

#[allow(dead_code)]
struct Both;

impl projection_handler::Guest for Both {
    fn handle(_batch: Vec<u8>) -> Result<(), Error> {
        Ok(())
    }
    fn query(_request: String) -> Result<String, Error> {
        Ok("null".into())
    }
}

impl tool_handler::Guest for Both {
    fn describe() -> ToolInfo {
        ToolInfo {
            name: "two-worlds".into(),
            description: "both".into(),
            input_schema: "{}".into(),
        }
    }
    fn invoke(input: String) -> Result<String, Error> {
        Ok(input)
    }
}

// Inside wasm only: native linkers refuse the interface-qualified export names.
#[cfg(target_arch = "wasm32")]
export!(Both);

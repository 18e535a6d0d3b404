//! batch-count (benchmarks only): decodes each batch with the SDK's decoder, touching every
//! envelope, and keeps the number of events and the sum of their positions.

wit_bindgen::generate!({
    path: "../../plugin-sdk/wit",
    world: "projection",
    generate_all,
});

use evhost::plugin::state;
use evhost::plugin::types::Error;
use exports::evhost::plugin::projection_handler::Guest;

#[allow(dead_code)]
struct Count;

impl Guest for Count {
    fn handle(batch: Vec<u8>) -> Result<(), Error> {
        let (mut n, mut sum) = (0u64, 0u64);
        for e in evhost_sdk::batch::iter(&batch).map_err(|e| Error::Failed(e.to_string()))? {
            let e = e.map_err(|e| Error::Failed(e.to_string()))?;
            n += 1;
            sum = sum.wrapping_add(e.position + e.event_type.len() as u64 + e.payload.len() as u64);
        }
        let before: u64 = state::get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
        state::set("n", &(before + n).to_string());
        state::set("sum", &sum.to_string());
        Ok(())
    }

    fn query(request: String) -> Result<String, Error> {
        Ok(state::get(&request).unwrap_or_else(|| "null".into()))
    }
}

// Inside wasm only: native linkers refuse the interface-qualified export names.
#[cfg(target_arch = "wasm32")]
export!(Count);

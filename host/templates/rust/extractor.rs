//! {{name}}: an evhost extractor. For every `order.placed` event of 100 or more, such as
//! `{"customer": "c-1", "total": 250}`, it appends an `order.flagged` event to the stream
//! `flagged-orders`, pointing back at the order.
//!
//! Build with `evhost plugin build`, run it over `fixtures/` with `evhost plugin test`,
//! and load it into a running host with `evhost plugin deploy --wait`.

use evhost_sdk::{Error, Event, Extractor, NewEvent};
use serde::{Deserialize, Serialize};

/// Orders of at least this total are flagged.
const LARGE: f64 = 100.0;

/// The payload of `order.placed`.
#[derive(Deserialize)]
struct OrderPlaced {
    customer: String,
    total: f64,
}

/// The payload of `order.flagged`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Flagged {
    pub order_stream: String,
    pub customer: String,
    pub total: f64,
}

pub struct Plugin;

impl Extractor for Plugin {
    type State = ();

    /// Derives what `event` implies; the host appends it exactly once, with its
    /// causation_id set to `event`'s id.
    fn extract(_: &mut (), event: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        let order: OrderPlaced = event.payload()?;
        if order.total >= LARGE {
            out.push(NewEvent::new(
                "order.flagged",
                "flagged-orders",
                &Flagged {
                    order_stream: event.stream.to_string(),
                    customer: order.customer,
                    total: order.total,
                },
            )?);
        }
        Ok(())
    }
}

evhost_sdk::export_extractor!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    #[test]
    fn flags_large_orders_only() {
        let out = Harness::<Plugin>::new()
            .extract(vec![
                Event::new("order.placed", r#"{"customer": "c-1", "total": 250}"#)
                    .with_stream("order-1"),
                Event::new("order.placed", r#"{"customer": "c-2", "total": 5}"#)
                    .with_stream("order-2"),
            ])
            .unwrap();
        assert_eq!(out[0].len(), 1);
        assert!(out[1].is_empty());
    }
}

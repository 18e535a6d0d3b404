//! {{name}}: an evhost projection. Per customer, it keeps how many orders they placed
//! and what they spent, from `order.placed` events such as
//! `{"customer": "c-1", "total": 12.5}`.
//!
//! Build with `evhost plugin build`, run it over `fixtures/` with `evhost plugin test`,
//! and load it into a running host with `evhost plugin deploy --wait`.

use std::borrow::Cow;

use evhost_sdk::{Error, Event, Projection};
use serde::{Deserialize, Serialize};

/// The payload of `order.placed`; its text borrows the event's (copied only if it has
/// escapes).
#[derive(Deserialize)]
struct OrderPlaced<'a> {
    #[serde(borrow)]
    customer: Cow<'a, str>,
    total: f64,
}

/// What is kept per customer, stored as JSON under the customer's id.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    pub orders: u64,
    pub spent: f64,
}

pub struct Plugin;

impl Projection for Plugin {
    type State = Customer;

    /// The state an event folds into: its customer's. An event without a customer is
    /// refused, and the host dead-letters it with this reason.
    fn key<'e>(event: &'e Event) -> Result<Cow<'e, str>, Error> {
        let order: OrderPlaced = event.payload()?;
        Ok(order.customer)
    }

    fn apply(_customer: &str, state: &mut Customer, event: &Event) -> Result<(), Error> {
        let order: OrderPlaced = event.payload()?;
        state.orders += 1;
        state.spent += order.total;
        Ok(())
    }
}

evhost_sdk::export_projection!(Plugin);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    #[test]
    fn folds_orders_per_customer() {
        let mut h = Harness::<Plugin>::new();
        h.handle(vec![
            Event::new("order.placed", r#"{"customer": "c-1", "total": 12.5}"#),
            Event::new("order.placed", r#"{"customer": "c-1", "total": 7.5}"#),
        ])
        .unwrap();
        assert_eq!(h.state("c-1"), Some(Customer { orders: 2, spent: 20.0 }));
    }

    #[test]
    fn an_order_without_a_customer_is_refused() {
        let mut h = Harness::<Plugin>::new();
        assert!(h.handle(vec![Event::new("order.placed", r#"{"total": 1}"#)]).is_err());
    }
}

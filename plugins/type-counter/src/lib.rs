//! type-counter: counts events by type, for whatever patterns its manifest subscribes to.

use std::borrow::Cow;

use evhost_sdk::{Error, Event, Projection};

/// Counts events per type; the state under key `T` is the number of `T` events seen.
pub struct TypeCounter;

impl Projection for TypeCounter {
    type State = u64;

    fn key<'e>(event: &'e Event) -> Result<Cow<'e, str>, Error> {
        Ok(Cow::Borrowed(&event.event_type))
    }

    fn apply(_type: &str, count: &mut u64, _event: &Event) -> Result<(), Error> {
        *count += 1;
        Ok(())
    }
}

evhost_sdk::export_projection!(TypeCounter);

#[cfg(test)]
mod tests {
    use super::*;
    use evhost_sdk::testing::Harness;

    #[test]
    fn counts_each_type() {
        let mut h = Harness::<TypeCounter>::new();
        h.handle(vec![
            Event::new("a.b", "1"),
            Event::new("a.c", "1"),
            Event::new("a.b", "1"),
        ])
        .unwrap();
        assert_eq!(h.state("a.b"), Some(2));
        assert_eq!(h.state("a.c"), Some(1));
    }
}

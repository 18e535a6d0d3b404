//! Lineage of derived events: the ids fixed by (plugin, source event, index) that make a
//! batch that runs again append nothing twice, the derivation depth that stops cycles
//! between extractors, and the recovery of what a runner appended before it last stopped.

use std::collections::HashSet;
use std::sync::Arc;

use crate::event::{Event, EventId};
use crate::log::{EventLog, ExpectedVersion, ReadFilter, StreamAppend};
use crate::plugin::Derived;

/// Metadata key counting how many derivations separate an event from one a client appended.
pub const DEPTH_KEY: &str = "derivation_depth";

/// Deepest chain of derived events: an event that would be derived deeper is dropped (and
/// counted), so extractors feeding each other in a cycle cannot spin forever.
pub const MAX_DERIVATION_DEPTH: u32 = 16;

/// The id of the `index`-th event `plugin` derived from the event with `source_id`: the
/// same on every run, so the log appends it once.
pub(crate) fn derived_id(plugin: &str, source_id: &str, index: usize) -> EventId {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [
        plugin.as_bytes(),
        source_id.as_bytes(),
        &(index as u64).to_be_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let bytes: [u8; 16] = h.finalize()[..16].try_into().expect("16 bytes");
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
        .into()
}

/// How many derivations separate `event` from a client's append.
pub(crate) fn depth_of(event: &Event) -> u32 {
    event
        .metadata
        .extra
        .get(DEPTH_KEY)
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// Marks the events of `append`, announcements derived from `from`, one derivation deeper.
pub(super) fn deepen(append: &mut StreamAppend, from: &Event) {
    for e in &mut append.events {
        e.metadata
            .extra
            .insert(DEPTH_KEY.to_owned(), (depth_of(from) + 1).to_string());
    }
}

/// Stamps `d`, derived from `from`, with its id (unless the handler fixed one), causation,
/// correlation and depth.
pub(crate) fn stamp(plugin: &str, from: &Event, index: usize, d: &mut Derived) {
    let m = &mut d.event.metadata;
    m.causation_id = Some(from.id.clone().into());
    if m.correlation_id.is_none() {
        m.correlation_id.clone_from(&from.metadata.correlation_id);
    }
    m.extra
        .insert(DEPTH_KEY.to_owned(), (depth_of(from) + 1).to_string());
    if d.event.id.is_none() {
        d.event.id = Some(derived_id(plugin, &from.id, index));
    }
}

/// The appends of a batch's derived events, in derivation order (consecutive events of one
/// stream share an append); also how many were kept and how many were too deep.
pub(super) fn derived_appends(
    plugin: &str,
    events: &[Arc<Event>],
    derived: Vec<Vec<Derived>>,
) -> (Vec<StreamAppend>, u64, u64) {
    let mut appends: Vec<StreamAppend> = Vec::new();
    let (mut kept, mut dropped) = (0, 0);
    for (from, list) in events.iter().zip(derived) {
        if depth_of(from) >= MAX_DERIVATION_DEPTH {
            dropped += list.len() as u64;
            continue;
        }
        for (index, mut d) in list.into_iter().enumerate() {
            stamp(plugin, from, index, &mut d);
            kept += 1;
            push_grouped(&mut appends, d);
        }
    }
    (appends, kept, dropped)
}

/// Adds `d` to `appends`, in order: to the last append when it is for the same stream.
pub(crate) fn push_grouped(appends: &mut Vec<StreamAppend>, d: Derived) {
    match appends.last_mut() {
        Some(a) if a.stream == d.stream => a.events.push(d.event),
        _ => appends.push(StreamAppend {
            stream: d.stream,
            expected: ExpectedVersion::Any,
            events: vec![d.event],
        }),
    }
}

/// Derived events a runner may have appended before it last stopped, for batches whose
/// checkpoint was not committed (a crash between the append and the commit, or storage that
/// lost recent commits). They are found once, by reading this plugin's events from the
/// checkpoint it started at to the head, and not appended again; past that head everything
/// it derives is new, so derived events need no per-event index. A plugin whose store
/// records no derived append ([`crate::plugin::PluginStore::mark_derived`], durable before
/// the first) has nothing to find.
pub(super) struct Recovery {
    from: u64,
    /// The head when the log was read, and the ids found below it; `None` until needed.
    seen: Option<(u64, HashSet<EventId>)>,
    done: bool,
}

impl Recovery {
    /// Recovery from checkpoint `from`; `needed` is false when the plugin never derived.
    pub(super) fn new(from: u64, needed: bool) -> Self {
        Self {
            from,
            seen: None,
            done: !needed,
        }
    }

    /// Removes from `appends` the events already in the log.
    pub(super) async fn drop_appended(
        &mut self,
        plugin: &str,
        log: &Arc<dyn EventLog>,
        appends: &mut Vec<StreamAppend>,
    ) -> Result<(), String> {
        if self.done {
            return Ok(());
        }
        if self.seen.is_none() {
            let until = log.head();
            let filter = ReadFilter {
                source: Some(plugin.to_owned()),
                ..ReadFilter::default()
            };
            let mut ids = HashSet::new();
            let mut from = self.from;
            while from < until {
                let page = log
                    .read(from, 10_000, &filter)
                    .await
                    .map_err(|e| format!("reading this plugin's earlier output failed: {e}"))?;
                ids.extend(
                    page.events
                        .into_iter()
                        .filter(|e| e.position < until)
                        .map(|e| e.id),
                );
                if page.next <= from {
                    break;
                }
                from = page.next;
            }
            if !ids.is_empty() {
                tracing::info!(
                    plugin,
                    found = ids.len(),
                    "derived events from before the restart are not appended again"
                );
            }
            self.seen = Some((until, ids));
        }
        let (_, ids) = self.seen.as_ref().expect("just read");
        if !ids.is_empty() {
            for a in appends.iter_mut() {
                a.events
                    .retain(|e| e.id.as_ref().is_none_or(|id| !ids.contains(id)));
            }
            appends.retain(|a| !a.events.is_empty());
        }
        Ok(())
    }

    /// Notes that the checkpoint reached `position`.
    pub(super) fn passed(&mut self, position: u64) {
        if let Some((until, _)) = &self.seen
            && position >= *until
        {
            self.seen = None;
            self.done = true;
        }
    }
}

//! The three plugin worlds as the host calls them: projections fold events into state,
//! extractors also derive events, tools run invocations.

use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::handler::{Derived, Handler, HandlerError, Output, on_blocking_thread};
use super::manifest::Kind;
use super::runtime::bindings::{extractor, projection, tool};
use super::runtime::{
    CallContext, HostState, NoState, Plugin, PluginError, StateView, World, Writes,
};
use crate::event::{Event, EventType, Metadata, NewEvent, Payload, validate_stream};

use projection::evhost::plugin::types as wit;

macro_rules! world {
    ($kind:expr, $bindings:ty, $pre:ty) => {
        impl World for $bindings {
            const KIND: Kind = $kind;
            type Pre = $pre;
            fn pre(pre: InstancePre<HostState>) -> wasmtime::Result<Self::Pre> {
                <$pre>::new(pre)
            }
            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<HostState>,
            ) -> wasmtime::Result<Self> {
                pre.instantiate(store)
            }
        }
    };
}

world!(
    Kind::Projection,
    projection::Projection,
    projection::ProjectionPre<HostState>
);
world!(
    Kind::Extractor,
    extractor::Extractor,
    extractor::ExtractorPre<HostState>
);
world!(Kind::Tool, tool::Tool, tool::ToolPre<HostState>);

/// A loaded projection.
pub type ProjectionPlugin = Plugin<projection::Projection>;
/// A loaded extractor.
pub type ExtractorPlugin = Plugin<extractor::Extractor>;
/// A loaded tool worker.
pub type ToolPlugin = Plugin<tool::Tool>;

/// What the sandbox shows during a batch: the time of its last event, a seed from its first.
fn batch_context(events: &[Arc<Event>]) -> CallContext {
    use sha2::Digest;
    let seed = events.first().map_or(0, |e| {
        let h = sha2::Sha256::digest(e.id.as_bytes());
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
    });
    CallContext {
        micros: events.last().map_or(0, |e| e.timestamp.timestamp_micros()),
        seed,
    }
}

impl<W: World> Plugin<W> {
    /// The call context a batch shows, respecting the grants: 0 unless clock / random are
    /// granted.
    fn context_for(&self, events: &[Arc<Event>]) -> CallContext {
        let b = batch_context(events);
        CallContext {
            micros: if self.caps.clock { b.micros } else { 0 },
            seed: if self.caps.random { b.seed } else { 0 },
        }
    }
}

impl ProjectionPlugin {
    /// Folds `events` into state over `view`; returns the writes to commit.
    pub fn fold(
        &self,
        view: Arc<dyn StateView>,
        events: &[Arc<Event>],
    ) -> Result<Writes, PluginError> {
        let batch: Vec<wit::Event> = events.iter().map(|e| to_wit(e)).collect();
        self.call(
            view,
            self.context_for(events),
            events.len() as u64,
            |b, store| b.call_handle(store, &batch),
        )
        .map(|((), writes)| writes)
    }

    /// Calls the projection's `query` export over `view` (its writes are discarded).
    pub fn query(&self, view: Arc<dyn StateView>, request: &str) -> Result<String, PluginError> {
        self.call(view, CallContext::default(), 0, |b, store| {
            b.call_query(store, request)
        })
        .map(|(answer, _)| answer)
    }
}

#[async_trait::async_trait]
impl Handler for ProjectionPlugin {
    fn id(&self) -> &str {
        Plugin::id(self)
    }
    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        let p = self.clone();
        on_blocking_thread(move || p.fold(view, &events))
            .await
            .map(|writes| Output {
                writes,
                derived: Vec::new(),
            })
    }
}

impl ExtractorPlugin {
    /// Runs the extractor over `events`: its state writes and, per event, what it derived.
    pub fn extract(
        &self,
        view: Arc<dyn StateView>,
        events: &[Arc<Event>],
    ) -> Result<Output, PluginError> {
        let batch: Vec<wit::Event> = events.iter().map(|e| to_wit(e)).collect();
        let units = events.len() as u64;
        let (lists, writes) = self.call(view, self.context_for(events), units, |b, store| {
            b.call_handle(store, &batch)
        })?;
        let invalid = |message: String| PluginError::Refused {
            plugin: self.plugin.to_string(),
            message,
        };
        if lists.len() != events.len() {
            return Err(invalid(format!(
                "returned {} lists of derived events for {} input events; the extractor world \
                 wants one list per input event",
                lists.len(),
                events.len()
            )));
        }
        let source = self.plugin.name().to_owned();
        let derived = lists
            .into_iter()
            .zip(events)
            .map(|(list, from)| {
                list.into_iter()
                    .map(|e| {
                        from_wit_new(e, &source).map_err(|m| {
                            invalid(format!(
                                "derived an invalid event from {} at position {}: {m}",
                                from.event_type.as_str(),
                                from.position
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Output { writes, derived })
    }
}

#[async_trait::async_trait]
impl Handler for ExtractorPlugin {
    fn id(&self) -> &str {
        Plugin::id(self)
    }
    async fn handle(
        &self,
        view: Arc<dyn StateView>,
        events: Arc<Vec<Arc<Event>>>,
    ) -> Result<Output, HandlerError> {
        let p = self.clone();
        on_blocking_thread(move || p.extract(view, &events)).await
    }
}

/// A tool's description, from its `describe` export.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ToolInfo {
    /// The name requests use.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its input.
    pub input_schema: serde_json::Value,
}

impl ToolPlugin {
    /// Calls `describe`.
    pub fn describe(&self) -> Result<ToolInfo, PluginError> {
        let (info, _) = self.call(Arc::new(NoState), CallContext::default(), 0, |b, store| {
            b.call_describe(store).map(Ok)
        })?;
        let input_schema =
            serde_json::from_str(&info.input_schema).map_err(|e| PluginError::Load {
                plugin: self.plugin.to_string(),
                message: format!("describe() returned an input schema that is not JSON: {e}"),
            })?;
        Ok(ToolInfo {
            name: info.name,
            description: info.description,
            input_schema,
        })
    }

    /// Runs one invocation on `input` (JSON text); returns its output (JSON text).
    pub fn invoke(&self, input: &str) -> Result<String, PluginError> {
        self.call(Arc::new(NoState), CallContext::default(), 1, |b, store| {
            b.call_invoke(store, input)
        })
        .map(|(out, _)| out)
    }
}

/// A derived event as the log takes it. Its size and count are checked by the runner against
/// the log's configured limits ([`crate::limits::OutputLimits`]), for every kind of handler.
fn from_wit_new(e: wit::NewEvent, source: &str) -> Result<Derived, String> {
    let event_type = EventType::new(&e.event_type).map_err(|e| e.to_string())?;
    if event_type.as_str().starts_with("evhost.") {
        // The host's own events (deletions, restores, erasures, audits) carry authority a
        // plugin does not have.
        return Err(format!(
            "a plugin cannot derive {event_type}: types under evhost. are the host's own"
        ));
    }
    validate_stream(&e.stream).map_err(|e| e.to_string())?;
    let payload = Payload::from_json(&e.payload)
        .map_err(|err| format!("the payload of {} is not JSON: {err}", e.event_type))?;
    Ok(Derived {
        stream: e.stream.into(),
        event: NewEvent {
            id: None,
            event_type,
            source: source.to_owned(),
            payload,
            metadata: Metadata::from_pairs(e.metadata),
        },
    })
}

fn to_wit(e: &Event) -> wit::Event {
    wit::Event {
        id: e.id.clone().into(),
        event_type: e.event_type.as_str().to_owned(),
        stream: e.stream.clone().into(),
        position: e.position,
        version: e.version,
        timestamp_micros: e.timestamp.timestamp_micros(),
        source: e.source.clone(),
        payload: e.payload.as_str().to_owned(),
        metadata: e.metadata.to_pairs(),
    }
}

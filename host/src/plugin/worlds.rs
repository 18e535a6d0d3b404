//! The three plugin worlds as the host calls them: projections fold events into state,
//! extractors also derive events, tools run invocations.

use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::contract::{GuestError, WitVersion, since_v0_1_0 as v1, since_v0_2_0 as v2};
use super::handler::{Derived, Handler, HandlerError, Output, on_blocking_thread};
use super::manifest::Kind;
use super::runtime::{
    CallContext, HostState, NoState, Plugin, PluginError, StateView, World, Writes,
};
use crate::event::{Event, EventType, Metadata, NewEvent, Payload, validate_stream};

/// Declares a world's exports and linked component as one enum each over the contract
/// versions, and its [`World`] impl.
macro_rules! world {
    ($kind:expr, $exports:ident, $pre:ident, $v1:ty, $v1pre:ty, $v2:ty, $v2pre:ty) => {
        /// The world's exports of one instance, at the version the component implements.
        pub enum $exports {
            /// `evhost:plugin@0.1.0`.
            V0_1($v1),
            /// `evhost:plugin@0.2.0`.
            V0_2($v2),
        }

        /// The world's linked component, at the version it implements.
        #[derive(Clone)]
        pub enum $pre {
            /// `evhost:plugin@0.1.0`.
            V0_1($v1pre),
            /// `evhost:plugin@0.2.0`.
            V0_2($v2pre),
        }

        impl World for $exports {
            const KIND: Kind = $kind;
            type Pre = $pre;
            fn pre(pre: InstancePre<HostState>, wit: WitVersion) -> wasmtime::Result<Self::Pre> {
                Ok(match wit {
                    WitVersion::V0_1_0 => $pre::V0_1(<$v1pre>::new(pre)?),
                    WitVersion::V0_2_0 => $pre::V0_2(<$v2pre>::new(pre)?),
                })
            }
            fn instantiate(
                pre: &Self::Pre,
                store: &mut Store<HostState>,
            ) -> wasmtime::Result<Self> {
                Ok(match pre {
                    $pre::V0_1(p) => $exports::V0_1(p.instantiate(store)?),
                    $pre::V0_2(p) => $exports::V0_2(p.instantiate(store)?),
                })
            }
        }
    };
}

world!(
    Kind::Projection,
    ProjectionExports,
    ProjectionPre,
    v1::projection::Projection,
    v1::projection::ProjectionPre<HostState>,
    v2::projection::Projection,
    v2::projection::ProjectionPre<HostState>
);
world!(
    Kind::Extractor,
    ExtractorExports,
    ExtractorPre,
    v1::extractor::Extractor,
    v1::extractor::ExtractorPre<HostState>,
    v2::extractor::Extractor,
    v2::extractor::ExtractorPre<HostState>
);
world!(
    Kind::Tool,
    ToolExports,
    ToolPre,
    v1::tool::Tool,
    v1::tool::ToolPre<HostState>,
    v2::tool::Tool,
    v2::tool::ToolPre<HostState>
);

/// A loaded projection.
pub type ProjectionPlugin = Plugin<ProjectionExports>;
/// A loaded extractor.
pub type ExtractorPlugin = Plugin<ExtractorExports>;
/// A loaded tool worker.
pub type ToolPlugin = Plugin<ToolExports>;

/// A batch as the component's version takes it: records (0.1.0) or one buffer (0.2.0).
enum Batch {
    Records(Vec<v1::types::Event>),
    Encoded(Vec<u8>),
}

impl Batch {
    fn for_version(wit: WitVersion, events: &[Arc<Event>]) -> Self {
        match wit {
            WitVersion::V0_1_0 => Batch::Records(events.iter().map(|e| to_wit(e)).collect()),
            WitVersion::V0_2_0 => Batch::Encoded(super::batch::encode(events)),
        }
    }
    fn records(&self) -> &[v1::types::Event] {
        match self {
            Batch::Records(r) => r,
            Batch::Encoded(_) => &[],
        }
    }
    fn bytes(&self) -> &Vec<u8> {
        static NONE: Vec<u8> = Vec::new();
        match self {
            Batch::Encoded(b) => b,
            Batch::Records(_) => &NONE,
        }
    }
}

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
        let batch = Batch::for_version(self.contract().wit, events);
        self.call(
            view,
            self.context_for(events),
            events.len() as u64,
            |b, store| match b {
                ProjectionExports::V0_1(b) => Ok(b
                    .call_handle(store, batch.records())?
                    .map_err(GuestError::from)),
                ProjectionExports::V0_2(b) => Ok(b
                    .evhost_plugin_projection_handler()
                    .call_handle(store, batch.bytes())?
                    .map_err(GuestError::from)),
            },
        )
        .map(|((), writes)| writes)
    }

    /// Calls the projection's `query` export over `view` (its writes are discarded).
    pub fn query(&self, view: Arc<dyn StateView>, request: &str) -> Result<String, PluginError> {
        self.call(view, CallContext::default(), 0, |b, store| match b {
            ProjectionExports::V0_1(b) => {
                Ok(b.call_query(store, request)?.map_err(GuestError::from))
            }
            ProjectionExports::V0_2(b) => Ok(b
                .evhost_plugin_projection_handler()
                .call_query(store, request)?
                .map_err(GuestError::from)),
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
        let batch = Batch::for_version(self.contract().wit, events);
        let units = events.len() as u64;
        let (lists, writes): (Vec<Vec<Fields>>, Writes) =
            self.call(view, self.context_for(events), units, |b, store| {
                Ok(match b {
                    ExtractorExports::V0_1(b) => b
                        .call_handle(store, batch.records())?
                        .map(|lists| {
                            lists
                                .into_iter()
                                .map(|l| l.into_iter().map(Fields::from).collect())
                                .collect()
                        })
                        .map_err(GuestError::from),
                    ExtractorExports::V0_2(b) => b
                        .evhost_plugin_extractor_handler()
                        .call_handle(store, batch.bytes())?
                        .map(|lists| {
                            lists
                                .into_iter()
                                .map(|l| l.into_iter().map(Fields::from).collect())
                                .collect()
                        })
                        .map_err(GuestError::from),
                })
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
        let mut last_type = None;
        let derived = lists
            .into_iter()
            .zip(events)
            .map(|(list, from)| {
                list.into_iter()
                    .map(|e| {
                        from_wit_new(e, &source, &mut last_type).map_err(|m| {
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
            Ok(Ok(match b {
                ToolExports::V0_1(b) => {
                    let i = b.call_describe(store)?;
                    (i.name, i.description, i.input_schema)
                }
                ToolExports::V0_2(b) => {
                    let i = b.evhost_plugin_tool_handler().call_describe(store)?;
                    (i.name, i.description, i.input_schema)
                }
            }))
        })?;
        let (name, description, input_schema) = info;
        let input_schema = serde_json::from_str(&input_schema).map_err(|e| PluginError::Load {
            plugin: self.plugin.to_string(),
            message: format!("describe() returned an input schema that is not JSON: {e}"),
        })?;
        Ok(ToolInfo {
            name,
            description,
            input_schema,
        })
    }

    /// Runs one invocation on `input` (JSON text); returns its output (JSON text).
    pub fn invoke(&self, input: &str) -> Result<String, PluginError> {
        self.call(Arc::new(NoState), CallContext::default(), 1, |b, store| {
            Ok(match b {
                ToolExports::V0_1(b) => b.call_invoke(store, input)?.map_err(GuestError::from),
                ToolExports::V0_2(b) => b
                    .evhost_plugin_tool_handler()
                    .call_invoke(store, input)?
                    .map_err(GuestError::from),
            })
        })
        .map(|(out, _)| out)
    }
}

/// A derived event as the log takes it. Its size and count are checked by the runner against
/// the log's configured limits ([`crate::limits::OutputLimits`]), for every kind of handler.
/// A derived event's fields, whatever the version it came through.
struct Fields {
    event_type: String,
    stream: String,
    payload: String,
    metadata: Vec<(String, String)>,
}

impl From<v1::types::NewEvent> for Fields {
    fn from(e: v1::types::NewEvent) -> Self {
        Fields {
            event_type: e.event_type,
            stream: e.stream,
            payload: e.payload,
            metadata: e.metadata,
        }
    }
}

impl From<v2::types::NewEvent> for Fields {
    fn from(e: v2::types::NewEvent) -> Self {
        Fields {
            event_type: e.event_type,
            stream: e.stream,
            payload: e.payload,
            metadata: e.metadata,
        }
    }
}

/// Checks and converts one derived event; `last_type` is the type of the one before, whose
/// checked text is shared when this one has the same (an extractor mostly derives one type).
fn from_wit_new(
    e: Fields,
    source: &str,
    last_type: &mut Option<EventType>,
) -> Result<Derived, String> {
    let event_type = match last_type {
        Some(t) if t.as_str() == e.event_type => t.clone(),
        _ => {
            let t = EventType::new(&e.event_type).map_err(|e| e.to_string())?;
            last_type.insert(t).clone()
        }
    };
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

fn to_wit(e: &Event) -> v1::types::Event {
    v1::types::Event {
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

//! evhost: an append-only event log and live bus that runs sandboxed WebAssembly
//! components as event handlers.
//!
//! Data flows one way: [`api`] -> [`log`] -> [`bus`] -> [`runner`] -> [`plugin`] runtime ->
//! commit. The log is the
//! source of truth; the bus only wakes subscribers.

#![warn(missing_docs, unreachable_pub)]

pub mod alerts;
pub mod api;
pub mod author;
pub mod bus;
pub mod cli;
pub mod dead_letter;
pub mod event;
pub(crate) mod flows;
pub mod host;
pub mod lease;
pub mod limits;
pub mod log;
pub mod pattern;
pub mod plugin;
pub mod registry;
pub mod runner;
pub mod schemas;
pub(crate) mod state_db;
pub mod telemetry;
pub(crate) mod tools;

pub use bus::{Bus, BusStats, Hub, Start, Subscription, SubscriptionId};
pub use event::{Event, EventId, EventType, InvalidName, Metadata, NewEvent, Payload, StreamName};
pub use host::{Host, HostConfig, HostError};
pub use log::{
    AppendError, Appended, CommitSink, ERASED_TYPE, Erased, EventLog, ExpectedVersion, LogError,
    MAX_STREAM_LIST, NatsLog, NatsLogConfig, ReadFilter, ReadPage, STREAM_DELETED_TYPE,
    STREAM_RESTORED_TYPE, SledLog, SledLogConfig, StreamAppend, StreamInfo, StreamList,
    StreamListQuery,
};
pub use pattern::{InvalidPattern, Pattern, PatternSet, Router};

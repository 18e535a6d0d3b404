//! What the host reports to Prometheus: the names of its metrics, and the recorder of the
//! `metrics` facade that keeps them, installed once per process. Work records into it
//! where it happens (appends and syncs in the log, batches in the runners, requests in
//! the API); the API's `/metrics` adds what it reads off the status of the log, the bus,
//! the plugins and the flow index at each scrape, and renders it. Calls nothing.

use std::sync::OnceLock;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Events appended and made durable.
pub const APPENDED_EVENTS: &str = "evhost_log_appended_events_total";
/// Bytes of chunks written to segments.
pub const APPENDED_BYTES: &str = "evhost_log_appended_bytes_total";
/// Events per group commit (one `fdatasync` each).
pub const GROUP_EVENTS: &str = "evhost_log_group_events";
/// Time of a group's `fdatasync` of its segment.
pub const FSYNC_SECONDS: &str = "evhost_log_fsync_seconds";
/// The log's head: one past the last durable position.
pub const HEAD: &str = "evhost_log_head";
/// HTTP requests answered, by route, method and status.
pub const HTTP_REQUESTS: &str = "evhost_http_requests_total";
/// Time to answer an HTTP request, by route and method.
pub const HTTP_SECONDS: &str = "evhost_http_request_duration_seconds";
/// Open bus subscriptions.
pub const BUS_SUBSCRIBERS: &str = "evhost_bus_subscribers";
/// Events the bus published.
pub const BUS_PUBLISHED: &str = "evhost_bus_published_events_total";
/// Times a slow subscriber was switched back to reading the log.
pub const BUS_RESYNCS: &str = "evhost_bus_resyncs_total";
/// Time from a batch's call to its commit, by plugin.
pub const PLUGIN_BATCH_SECONDS: &str = "evhost_plugin_batch_duration_seconds";
/// Events a plugin handled since its state started.
pub const PLUGIN_EVENTS: &str = "evhost_plugin_events_processed_total";
/// Events between a plugin's checkpoint and the head.
pub const PLUGIN_LAG: &str = "evhost_plugin_lag_events";
/// A plugin's checkpoint.
pub const PLUGIN_POSITION: &str = "evhost_plugin_position";
/// Failed calls since the plugin's runner started.
pub const PLUGIN_FAILURES: &str = "evhost_plugin_failures_total";
/// Events waiting in a plugin's dead-letter store.
pub const PLUGIN_DEAD_LETTERS: &str = "evhost_plugin_dead_letters";
/// 1 while a plugin is quarantined.
pub const PLUGIN_QUARANTINED: &str = "evhost_plugin_quarantined";
/// Time per event of the calls that handled events.
pub const PLUGIN_SECONDS_PER_EVENT: &str = "evhost_plugin_seconds_per_event";
/// The most linear memory a plugin's instance reached.
pub const PLUGIN_PEAK_MEMORY: &str = "evhost_plugin_peak_memory_bytes";
/// Fuel a budgeted plugin burned.
pub const PLUGIN_FUEL: &str = "evhost_plugin_fuel_used_total";
/// A candidate's (or shadow's) lag while an upgrade builds it.
pub const PLUGIN_CANDIDATE_LAG: &str = "evhost_plugin_candidate_lag_events";
/// Tool invocations with an outcome, by tool and outcome (`completed`, `failed`).
pub const TOOL_INVOCATIONS: &str = "evhost_tool_invocations_total";
/// Requested -> outcome latency of a tool's invocations, recorded by the flow index.
pub const TOOL_LATENCY: &str = "evhost_tool_latency_seconds";
/// End-to-end latency of answered flows, recorded by the flow index.
pub const FLOW_LATENCY: &str = "evhost_flow_latency_seconds";
/// Flows answered.
pub const FLOWS_ANSWERED: &str = "evhost_flows_answered_total";
/// 1 while an alert is raised, by alert and subject (0 once cleared).
pub const ALERT_ACTIVE: &str = "evhost_alert_active";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as this process's `metrics` recorder, once, and
/// returns its handle; `None` when the program embedding the host installed another.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let events = [1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0];
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(GROUP_EVENTS.into()), &events))
                .and_then(|b| b.install_recorder().map_err(Into::into));
            match built {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "another metrics recorder is installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        APPENDED_EVENTS,
        Unit::Count,
        "Events appended and made durable."
    );
    describe_counter!(
        APPENDED_BYTES,
        Unit::Bytes,
        "Bytes of chunks written to segments."
    );
    describe_histogram!(
        GROUP_EVENTS,
        Unit::Count,
        "Events per group commit (one fdatasync each)."
    );
    describe_histogram!(
        FSYNC_SECONDS,
        Unit::Seconds,
        "Time of a group's fdatasync of its segment."
    );
    describe_gauge!(HEAD, Unit::Count, "One past the last durable position.");
    describe_counter!(
        HTTP_REQUESTS,
        Unit::Count,
        "HTTP requests answered, by route, method and status."
    );
    describe_histogram!(
        HTTP_SECONDS,
        Unit::Seconds,
        "Time to answer an HTTP request, by route and method."
    );
    describe_gauge!(BUS_SUBSCRIBERS, Unit::Count, "Open bus subscriptions.");
    describe_counter!(
        BUS_PUBLISHED,
        Unit::Count,
        "Events the bus published since the host started."
    );
    describe_counter!(
        BUS_RESYNCS,
        Unit::Count,
        "Times a slow subscriber went back to reading the log."
    );
    describe_histogram!(
        PLUGIN_BATCH_SECONDS,
        Unit::Seconds,
        "Time from a batch's call to its commit, by plugin."
    );
    describe_counter!(
        PLUGIN_EVENTS,
        Unit::Count,
        "Events a plugin handled since its state started."
    );
    describe_gauge!(
        PLUGIN_LAG,
        Unit::Count,
        "Events between a plugin's checkpoint and the head."
    );
    describe_gauge!(PLUGIN_POSITION, Unit::Count, "A plugin's checkpoint.");
    describe_counter!(
        PLUGIN_FAILURES,
        Unit::Count,
        "Failed calls since the plugin's runner started."
    );
    describe_gauge!(
        PLUGIN_DEAD_LETTERS,
        Unit::Count,
        "Events waiting in a plugin's dead-letter store."
    );
    describe_gauge!(
        PLUGIN_QUARANTINED,
        Unit::Count,
        "1 while the plugin is quarantined."
    );
    describe_gauge!(
        PLUGIN_SECONDS_PER_EVENT,
        Unit::Seconds,
        "Time per event of the calls that handled events."
    );
    describe_gauge!(
        PLUGIN_PEAK_MEMORY,
        Unit::Bytes,
        "The most linear memory the plugin's instance reached."
    );
    describe_counter!(PLUGIN_FUEL, Unit::Count, "Fuel a budgeted plugin burned.");
    describe_gauge!(
        PLUGIN_CANDIDATE_LAG,
        Unit::Count,
        "A candidate's (or shadow's) lag while an upgrade builds it."
    );
    describe_counter!(
        TOOL_INVOCATIONS,
        Unit::Count,
        "Tool invocations with an outcome, by tool and outcome."
    );
    describe_histogram!(
        TOOL_LATENCY,
        Unit::Seconds,
        "Requested to outcome latency of a tool's invocations."
    );
    describe_histogram!(
        FLOW_LATENCY,
        Unit::Seconds,
        "End-to-end latency of answered flows."
    );
    describe_counter!(FLOWS_ANSWERED, Unit::Count, "Flows answered.");
    describe_gauge!(
        ALERT_ACTIVE,
        Unit::Count,
        "1 while an alert is raised, by alert and subject."
    );
}

//! `GET /metrics`: the Prometheus text format. What the host records as work happens,
//! with what this scrape reads off the log, the bus, the plugins and the flow index.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use metrics::{counter, gauge};
use serde_json::Value;

use super::{ApiError, AppState};
use crate::telemetry as t;

/// `GET /metrics`.
pub(super) async fn get_metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let Some(handle) = t::install() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics_unavailable",
            "the program embedding this host installed its own metrics recorder; read the metrics there",
        ));
    };
    refresh(&st).await;
    handle.run_upkeep();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

/// Counts read off status that start over (a runner's since it started, a state's since it
/// was built) made monotonic for Prometheus: by (metric, plugin), the last value read and
/// what came before its last drop.
static TOTALS: Mutex<Option<HashMap<(&'static str, String), (u64, u64)>>> = Mutex::new(None);

/// `value` of a count that may start over, as a total that never goes back.
fn total(metric: &'static str, plugin: &str, value: u64) -> u64 {
    let mut totals = TOTALS.lock().expect("metric totals");
    let (last, base) = totals
        .get_or_insert_with(HashMap::new)
        .entry((metric, plugin.to_owned()))
        .or_insert((0, 0));
    if value < *last {
        *base += *last;
    }
    *last = value;
    *base + value
}

/// Sets what is read off status, at this scrape.
async fn refresh(st: &AppState) {
    gauge!(t::HEAD).set(st.log.head() as f64);
    let bus = st.bus.stats();
    gauge!(t::BUS_SUBSCRIBERS).set(bus.subscriptions as f64);
    counter!(t::BUS_PUBLISHED).absolute(bus.published);
    counter!(t::BUS_RESYNCS).absolute(bus.resyncs);
    let mut tools = HashSet::new();
    if let Some(reg) = &st.registry {
        for p in reg.list().await {
            if p.tool.is_some() {
                tools.insert(p.name.clone());
            }
            let plugin = p.name.clone();
            let l = [("plugin", plugin)];
            counter!(t::PLUGIN_EVENTS, &l).absolute(total(
                t::PLUGIN_EVENTS,
                &p.name,
                p.status.events_processed,
            ));
            gauge!(t::PLUGIN_LAG, &l).set(p.lag as f64);
            gauge!(t::PLUGIN_POSITION, &l).set(p.status.position as f64);
            counter!(t::PLUGIN_FAILURES, &l).absolute(total(
                t::PLUGIN_FAILURES,
                &p.name,
                p.status.errors,
            ));
            gauge!(t::PLUGIN_DEAD_LETTERS, &l).set(p.dead_letters as f64);
            gauge!(t::PLUGIN_QUARANTINED, &l)
                .set(f64::from(u8::from(p.status.quarantine.is_some())));
            gauge!(t::PLUGIN_PEAK_MEMORY, &l).set(p.usage.peak_memory_bytes as f64);
            if let Some(ns) = p.usage.ns_per_event {
                gauge!(t::PLUGIN_SECONDS_PER_EVENT, &l).set(ns / 1e9);
            }
            if p.usage.fuel_per_event.is_some() {
                counter!(t::PLUGIN_FUEL, &l).absolute(p.usage.fuel_consumed);
            }
            gauge!(t::PLUGIN_CANDIDATE_LAG, &l)
                .set(p.candidate.as_ref().map_or(0.0, |c| c.lag as f64));
        }
    }
    if let Some(alerts) = &st.alerts {
        for (alert, subject, on) in alerts.states() {
            gauge!(t::ALERT_ACTIVE, "alert" => alert, "subject" => subject)
                .set(f64::from(u8::from(on)));
        }
    }
    if let Some(store) = &st.flows {
        let store = store.clone();
        let figures = tokio::task::spawn_blocking(move || crate::flows::metrics(&store)).await;
        if let Ok(Ok(m)) = figures {
            flow_figures(&m, &tools);
        }
    }
}

/// The flow index's durable figures: per tool invocations by outcome, and flows answered
/// (their latencies are histograms the index records as it goes).
fn flow_figures(m: &Value, loaded: &HashSet<String>) {
    if let Some(tools) = m["tools"].as_object() {
        // Only loaded tools: a request may name any tool, and each name would be a series.
        for (tool, f) in tools.iter().filter(|(t, _)| loaded.contains(*t)) {
            for outcome in ["completed", "failed"] {
                let n = f[outcome].as_u64().unwrap_or(0);
                counter!(t::TOOL_INVOCATIONS, "tool" => tool.clone(), "outcome" => outcome)
                    .absolute(n);
            }
        }
    }
    counter!(t::FLOWS_ANSWERED).absolute(m["flows"]["answered"].as_u64().unwrap_or(0));
}

/// `GET /v1/alerts`: the alerts raised now (none when no threshold is configured).
pub(super) async fn get_alerts(State(st): State<AppState>) -> axum::Json<Value> {
    let active = st.alerts.as_ref().map(|a| a.active()).unwrap_or_default();
    axum::Json(serde_json::json!({"alerts": active, "configured": st.alerts.is_some()}))
}

/// Records an HTTP request's route, method, status and time, and runs it in a `request`
/// span that the log lines it causes carry.
pub(super) async fn track(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    // A fixed set, so a client cannot add series by inventing methods.
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let span = tracing::info_span!("request", method, route = %route);
    let response = tracing::Instrument::instrument(next.run(request), span).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(t::HTTP_SECONDS, "route" => route.clone(), "method" => method)
        .record(started.elapsed());
    counter!(t::HTTP_REQUESTS, "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

#[cfg(test)]
mod tests {
    use super::total;

    #[test]
    fn a_count_that_starts_over_stays_a_total_that_never_goes_back() {
        let seen: Vec<u64> = [5, 7, 2, 3, 0, 4]
            .into_iter()
            .map(|v| total("test_total", "p", v))
            .collect();
        assert_eq!(seen, [5, 7, 9, 10, 10, 14]);
        assert_eq!(total("test_total", "other", 1), 1, "kept apart by plugin");
    }
}

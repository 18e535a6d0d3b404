//! Serving connections: HTTP/1.1 over hyper with a header timeout, a connection cap, accept
//! errors backed off, and a shutdown with a deadline.
//!
//! Without these, a few hundred clients that open a connection and send half a request
//! hold a file descriptor each for ever, enough of them exhaust the process's descriptors
//! (and with them the log's next segment and every plugin load), and one `evhost events
//! tail` keeps SIGTERM from ever completing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower_http::timeout::RequestBodyTimeout;

/// How the server treats connections.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Time a connection has to send a complete request head: on a new connection, and on
    /// an idle keep-alive one between requests. Closed when it passes. Also the longest
    /// pause allowed inside a request body (the request then fails).
    pub header_timeout: Duration,
    /// Most connections open at once; a connection beyond it is answered 503 and closed.
    pub max_connections: usize,
    /// Time connections get to finish after a shutdown is asked for; then they are closed.
    pub shutdown_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// Tells long-lived responses (subscriptions, waits) that the host is shutting down, so
/// they end instead of holding the shutdown up.
#[derive(Clone)]
pub struct Closing {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Closing {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::channel(false).0),
        }
    }
}

impl Closing {
    /// Marks the host as shutting down; every [`Closing::closed`] future resolves.
    pub fn close(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once the host is shutting down.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + use<> {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }
}

/// Longest pause after a failed accept (e.g. EMFILE: out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The reply a connection over the cap gets before it is closed.
fn over_cap_reply(cap: usize) -> Vec<u8> {
    let body = format!(
        r#"{{"error":{{"code":"too_many_connections","message":"the host has {cap} connections open, its limit (--max-connections); retry later"}}}}"#
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `router` on `listener` until `shutdown` resolves, then marks `closing`, lets the
/// open connections finish for at most `config.shutdown_timeout`, and closes the rest.
pub(super) async fn serve_connections(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    closing: Closing,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let service = RequestBodyTimeout::new(router, config.header_timeout);
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let mut backoff = Duration::ZERO;
    let mut refused = 0u64;
    let over_cap = over_cap_reply(config.max_connections);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accepting a connection failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse(stream, &over_cap, &mut refused, config.max_connections);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    closing.close();
    let open = graceful.count();
    if tokio::time::timeout(config.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open_at_start = open,
            timeout_ms = config.shutdown_timeout.as_millis() as u64,
            "connections still open at the shutdown deadline; closing them"
        );
    }
    connections.shutdown().await;
}

/// Answers a connection over the cap with a 503 (if its socket takes it at once) and
/// closes it.
fn refuse(stream: TcpStream, reply: &[u8], refused: &mut u64, cap: usize) {
    let _ = stream.try_write(reply);
    *refused += 1;
    if refused.is_power_of_two() {
        tracing::warn!(
            refused = *refused,
            max_connections = cap,
            "connection refused: --max-connections are open"
        );
    }
}

/// Errors of one incoming connection, not of the listener: the next accept may succeed.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_over_cap_reply_has_the_length_it_says() {
        let reply = over_cap_reply(1024);
        let text = std::str::from_utf8(&reply).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }
}

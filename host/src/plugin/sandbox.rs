//! What a plugin's sandbox grants: a WASI context with no files, environment, arguments or
//! sockets; a clock and randomness that are real only when granted (and deterministic for
//! handlers of the log); outgoing HTTP only to the hosts the manifest lists.

use super::logs::PluginLogs;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};
use wasmtime_wasi_http::WasiHttpHooks;

use super::manifest::{Capabilities, Kind};

/// The time and seed a deterministic sandbox shows the plugin during one call; the runner
/// sets them from the batch before the call.
#[derive(Debug, Default)]
pub(super) struct CallClock {
    /// Microseconds since the Unix epoch.
    micros: AtomicI64,
    /// Seed of the call's random numbers.
    seed: AtomicU64,
    /// Counts calls, so each call's numbers start over from its seed.
    call: AtomicU64,
}

impl CallClock {
    /// Shows `micros` as the time and seeds randomness with `seed` for the next call.
    pub(super) fn set(&self, micros: i64, seed: u64) {
        self.micros.store(micros, Ordering::Relaxed);
        self.seed.store(seed, Ordering::Relaxed);
        self.call.fetch_add(1, Ordering::Relaxed);
    }
}

/// A wall clock that reads the call's time.
struct FixedWall(Arc<CallClock>);

impl HostWallClock for FixedWall {
    fn resolution(&self) -> Duration {
        Duration::from_micros(1)
    }
    fn now(&self) -> Duration {
        Duration::from_micros(self.0.micros.load(Ordering::Relaxed).max(0) as u64)
    }
}

/// A monotonic clock that reads the call's time.
struct FixedMonotonic(Arc<CallClock>);

impl HostMonotonicClock for FixedMonotonic {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        (self.0.micros.load(Ordering::Relaxed).max(0) as u64).saturating_mul(1_000)
    }
}

/// Random numbers from the call's seed (splitmix64), starting over at every call: the same
/// call gives the same numbers.
struct SeededRandom {
    clock: Arc<CallClock>,
    /// The call this stream belongs to, to start over at the next call.
    call: u64,
    state: u64,
}

impl SeededRandom {
    fn new(clock: Arc<CallClock>) -> Self {
        Self {
            clock,
            call: u64::MAX,
            state: 0,
        }
    }

    fn next(&mut self) -> u64 {
        let call = self.clock.call.load(Ordering::Relaxed);
        if call != self.call {
            self.call = call;
            self.state = self.clock.seed.load(Ordering::Relaxed);
        }
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for SeededRandom {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.next() as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.next())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            let n = self.next().to_le_bytes();
            chunk.copy_from_slice(&n[..chunk.len()]);
        }
        Ok(())
    }
}

/// The WASI context of a plugin of `kind` with `caps`.
///
/// - Projections and extractors always see the call's clock and seed (the runner sets them
///   from the batch), so a replay computes what the first run did; without the `clock` or
///   `random` grant the clock reads 0 (1970) and the seed is 0.
/// - Tools see the real clock and real randomness only when granted; otherwise the same
///   fixed clock and seed.
pub(super) fn wasi_ctx(
    kind: Kind,
    caps: &Capabilities,
    clock: &Arc<CallClock>,
    logs: &PluginLogs,
) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    // What the plugin prints goes to its bounded log buffer, never to the host's output.
    b.stdout(logs.stream(false)).stderr(logs.stream(true));
    // No arguments, environment, preopened directories, stdin; sockets are denied by
    // default, and HTTP goes only through the allow-list below.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    let real = kind == Kind::Tool;
    if !(real && caps.clock) {
        b.wall_clock(FixedWall(clock.clone()));
        b.monotonic_clock(FixedMonotonic(clock.clone()));
    }
    if !(real && caps.random) {
        b.secure_random(SeededRandom::new(clock.clone()));
        b.insecure_random(SeededRandom::new(clock.clone()));
        b.insecure_random_seed(0);
    }
    b.build()
}

/// Outgoing HTTP policy: only `host:port` pairs of the grant, with every wait bounded.
pub(super) struct HttpGrant {
    allowed: Arc<HashSet<String>>,
    timeout: Duration,
    plugin: Arc<str>,
}

impl HttpGrant {
    /// A policy allowing `hosts` (`host:port`), each wait at most `timeout`.
    pub(super) fn new(hosts: &[String], timeout: Duration, plugin: Arc<str>) -> Self {
        Self {
            allowed: Arc::new(hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
            timeout,
            plugin,
        }
    }

    /// True when a request to `uri` may be sent.
    fn admits(&self, uri: &http::Uri) -> bool {
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        uri.authority().is_some_and(|a| {
            !a.as_str().contains('@')
                && self.allowed.contains(&format!(
                    "{}:{}",
                    a.host().to_ascii_lowercase(),
                    a.port_u16().unwrap_or(if https { 443 } else { 80 })
                ))
        })
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>;
type SendFuture = Box<
    dyn Future<
            Output = Result<
                (http::Response<wasmtime_wasi_http::WasiBody>, IoFuture),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpGrant {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        io: IoFuture,
    ) -> SendFuture {
        if !self.admits(request.uri()) {
            tracing::warn!(
                plugin = &*self.plugin,
                uri = %request.uri(),
                "outgoing HTTP denied: the host is not in the plugin's capabilities.http"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let options = wasmtime_wasi_http::RequestOptions {
            connect_timeout: Some(self.timeout),
            first_byte_timeout: Some(self.timeout),
            between_bytes_timeout: Some(self.timeout),
        };
        wasmtime_wasi_http::default_hooks().send_request(request, Some(options), io)
    }
}

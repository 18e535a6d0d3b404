//! Leases: on a cluster of hosts sharing one NATS log, each plugin runs on one host at a
//! time, the one holding its lease.
//!
//! A lease is a key (`plugin.<name>`) in a JetStream KV bucket (`<stream>_leases`, with the
//! log's replicas) whose entries expire after the lease's time to live (the bucket's
//! `max_age`). A host takes a free lease with a create (it fails if the key exists), renews
//! it with an update that expects the revision it holds (it fails if anyone wrote the key
//! since), and gives it up with a delete expecting that revision. The revision it took the
//! lease at is its fencing token.
//!
//! Fencing is by time, on the holder's own monotonic clock: a renewal sent at `t` holds the
//! lease until `t + ttl × 0.8`, and the server expires the entry no sooner than `ttl` after
//! it stored it (which is after `t`). So a holder that cannot renew (cut off, stalled)
//! starts no append once another host could take the lease over; a runner asks
//! [`Lease::holds`] before every batch, job and derived append. What fencing cannot stop
//! (an append already in flight at the deadline) the log settles: derived events and tool
//! starts and outcomes have fixed ids, indexed on the NATS log, so a second copy is never
//! stored, and a tool runs only for the host whose start event the log stored
//! ([`crate::log::Appended::written`]).
//!
//! A host that dies holds its leases until they expire: another host takes a plugin over at
//! most `ttl + ttl / 4` later (it looks every quarter of the time to live). A host that
//! stops, or unloads a plugin, gives its leases up at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

/// Time to live of a lease, unless the cluster's bucket says otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Which host holds a lease, as recorded in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The host's id (`--host-id`).
    pub host: String,
    /// Where the host's API is reached, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

/// Where a lease stands, as this host knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Not known yet, or lost without knowing who has it now.
    Unknown,
    /// This host holds it, with the fencing token, until the deadline (unless renewed).
    Held {
        /// The bucket's revision when this host took the lease.
        token: u64,
        /// When the lease lapses on this host's clock unless renewed first.
        until: Instant,
    },
    /// Another host holds it.
    Elsewhere(Holder),
}

/// Where a plugin runs, for its status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Placement {
    /// The host that runs it (`None` while no host is known to hold its lease).
    pub host: Option<String>,
    /// That host's API, when it said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// True when it runs on the host answering.
    pub here: bool,
    /// The fencing token this host holds it under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
}

/// What went wrong with the lease bucket.
#[derive(Debug, thiserror::Error)]
#[error(
    "the lease bucket {bucket} in NATS: {message}; check that the servers given to --log are up"
)]
pub struct LeaseError {
    bucket: String,
    message: String,
}

/// This host's side of the cluster's leases: the ones it wants, renewed in the background.
#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

struct Inner {
    kv: kv::Store,
    me: Holder,
    ttl: Duration,
    claims: Mutex<HashMap<String, Claim>>,
    /// Wakes the keeper early: a new claim, or a claim given up.
    wake: Notify,
}

/// A lease this host wants, held or not.
struct Claim {
    /// The runners that want it (a plugin and the version an upgrade builds beside it).
    wanted: usize,
    state: watch::Sender<LeaseState>,
    /// The revision of the entry this host last wrote, while it holds the lease.
    revision: Option<u64>,
}

impl Leases {
    /// Opens (or creates) the lease bucket `<stream>_leases` with `replicas` copies and
    /// starts renewing, as `me`. A bucket that exists keeps its time to live.
    pub async fn open(
        js: async_nats::jetstream::Context,
        stream: &str,
        replicas: usize,
        ttl: Duration,
        me: Holder,
    ) -> Result<Self, LeaseError> {
        let bucket = format!("{stream}_leases");
        let error = |message: String| LeaseError {
            bucket: bucket.clone(),
            message,
        };
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "evhost: which host runs each plugin".into(),
                    history: 1,
                    max_age: ttl,
                    num_replicas: replicas,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| error(format!("creating it failed: {e}")))?,
        };
        let ttl = match kv.status().await {
            Ok(s) if s.max_age() > Duration::ZERO => {
                if s.max_age() != ttl {
                    tracing::warn!(bucket, configured = ?ttl, bucket_ttl = ?s.max_age(), "the lease bucket exists with another time to live; using the bucket's");
                }
                s.max_age()
            }
            Ok(_) => {
                return Err(error(
                    "it keeps entries forever (no max_age), so a dead host's leases never lapse; delete the bucket and start again".into(),
                ));
            }
            Err(e) => return Err(error(format!("reading its settings failed: {e}"))),
        };
        let inner = Arc::new(Inner {
            kv,
            me,
            ttl,
            claims: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        tokio::spawn(keep(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The lease's time to live: a dead host's plugins are taken over within 1.25 times it.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// This host, as recorded in the leases it holds.
    pub fn me(&self) -> &Holder {
        &self.inner.me
    }

    /// Asks for the lease of plugin `name`; it is held for as long as any returned
    /// [`Lease`] (or a clone) lives, and given up when the last is dropped.
    pub fn claim(&self, name: &str) -> Lease {
        let state = {
            let mut claims = self.inner.claims.lock().expect("lease claims lock");
            let claim = claims.entry(name.to_owned()).or_insert_with(|| Claim {
                wanted: 0,
                state: watch::channel(LeaseState::Unknown).0,
                revision: None,
            });
            claim.wanted += 1;
            claim.state.subscribe()
        };
        self.inner.wake.notify_one();
        Lease {
            name: name.to_owned(),
            inner: self.inner.clone(),
            state,
        }
    }

    /// Gives up every lease this host holds (at shutdown, after its runners stopped), so
    /// other hosts take the plugins over at once.
    pub async fn release_all(&self) {
        let held: Vec<(String, u64)> = {
            let mut claims = self.inner.claims.lock().expect("lease claims lock");
            claims
                .drain()
                .filter_map(|(name, c)| {
                    // A runner still holding on sees the lease gone, not held to its deadline.
                    c.state.send_replace(LeaseState::Unknown);
                    c.revision.map(|r| (name, r))
                })
                .collect()
        };
        for (name, revision) in held {
            self.inner.release(&name, revision).await;
        }
    }
}

/// One runner's hold on a plugin's lease.
pub struct Lease {
    name: String,
    inner: Arc<Inner>,
    state: watch::Receiver<LeaseState>,
}

impl Clone for Lease {
    fn clone(&self) -> Self {
        if let Some(c) = self
            .inner
            .claims
            .lock()
            .expect("lease claims lock")
            .get_mut(&self.name)
        {
            c.wanted += 1;
        }
        Self {
            name: self.name.clone(),
            inner: self.inner.clone(),
            state: self.state.clone(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut claims = self.inner.claims.lock().expect("lease claims lock");
        let unwanted = match claims.get_mut(&self.name) {
            Some(c) => {
                c.wanted = c.wanted.saturating_sub(1);
                c.wanted == 0
            }
            None => false,
        };
        drop(claims);
        if unwanted {
            self.inner.wake.notify_one();
        }
    }
}

impl Lease {
    /// True while this host holds the lease and its deadline has not passed: what a runner
    /// asks before each append and commit.
    pub fn holds(&self) -> bool {
        matches!(*self.state.borrow(), LeaseState::Held { until, .. } if Instant::now() < until)
    }

    /// Waits until this host holds the lease.
    pub async fn acquired(&mut self) {
        loop {
            if self.holds() {
                return;
            }
            if self.state.changed().await.is_err() {
                // The keeper is gone (the host is stopping): never acquired.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until this host no longer holds the lease: told so, or its deadline passed
    /// without a renewal.
    pub async fn lost(&mut self) {
        loop {
            let until = match &*self.state.borrow_and_update() {
                LeaseState::Held { until, .. } => *until,
                _ => return,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {
                    if !self.holds() {
                        return;
                    }
                }
                r = self.state.changed() => if r.is_err() { return },
            }
        }
    }

    /// Where the plugin runs, as this host knows it.
    pub fn placement(&self) -> Placement {
        let me = &self.inner.me;
        match &*self.state.borrow() {
            LeaseState::Held { token, until } if Instant::now() < *until => Placement {
                host: Some(me.host.clone()),
                api: me.api.clone(),
                here: true,
                token: Some(*token),
            },
            LeaseState::Elsewhere(h) => Placement {
                host: Some(h.host.clone()),
                api: h.api.clone(),
                here: false,
                token: None,
            },
            _ => Placement {
                host: None,
                api: None,
                here: false,
                token: None,
            },
        }
    }
}

/// The key of plugin `name`'s lease (plugin names are lowercase letters, digits and `-`,
/// all valid in a key).
fn key(name: &str) -> String {
    format!("plugin.{name}")
}

impl Inner {
    fn value(&self) -> bytes::Bytes {
        serde_json::to_vec(&self.me)
            .expect("a holder serializes")
            .into()
    }

    /// How long a write sent now holds the lease on this host's clock.
    fn deadline(&self, sent: Instant) -> Instant {
        sent + self.ttl.mul_f64(0.8)
    }

    async fn release(&self, name: &str, revision: u64) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(key(name), Some(revision))
            .await
        {
            tracing::debug!(plugin = name, error = %e, "giving up the lease failed; it lapses by itself");
        }
    }

    /// One round for `name`: renew it if held, take it if free, else note who holds it.
    async fn round(&self, name: &str, revision: Option<u64>) -> (LeaseState, Option<u64>) {
        let sent = Instant::now();
        if let Some(r) = revision {
            match self.kv.update(key(name), self.value(), r).await {
                Ok(r) => {
                    // Renewed: the token stays the revision the lease was taken at.
                    let token = match self.current(name) {
                        LeaseState::Held { token, .. } => token,
                        _ => r,
                    };
                    return self.held(token, r, sent);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(
                        plugin = name,
                        "lost the plugin's lease (another host wrote it, or it lapsed)"
                    );
                }
                Err(e) => {
                    // Cannot tell: the lease holds until its deadline passes.
                    tracing::warn!(plugin = name, error = %e, "renewing the plugin's lease failed");
                    return (self.current(name), Some(r));
                }
            }
        }
        match self.kv.create(key(name), self.value()).await {
            Ok(r) => {
                tracing::info!(
                    plugin = name,
                    token = r,
                    "took the plugin's lease: it runs here"
                );
                return self.held(r, r, sent);
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::debug!(plugin = name, error = %e, "taking the plugin's lease failed");
                return (LeaseState::Unknown, None);
            }
        }
        match self.kv.entry(key(name)).await {
            Ok(Some(entry)) => match serde_json::from_slice::<Holder>(&entry.value) {
                // A lease this host's last run held (it stopped without giving it up).
                Ok(h) if h.host == self.me.host => {
                    match self
                        .kv
                        .update(key(name), self.value(), entry.revision)
                        .await
                    {
                        Ok(r) => {
                            tracing::info!(
                                plugin = name,
                                token = r,
                                "took back the plugin's lease from this host's last run"
                            );
                            self.held(r, r, sent)
                        }
                        Err(_) => (LeaseState::Unknown, None),
                    }
                }
                Ok(h) => (LeaseState::Elsewhere(h), None),
                Err(_) => (
                    LeaseState::Elsewhere(Holder {
                        host: "(unreadable lease entry)".into(),
                        api: None,
                    }),
                    None,
                ),
            },
            _ => (LeaseState::Unknown, None),
        }
    }

    fn current(&self, name: &str) -> LeaseState {
        let claims = self.claims.lock().expect("lease claims lock");
        claims
            .get(name)
            .map_or(LeaseState::Unknown, |c| c.state.borrow().clone())
    }

    /// The outcome of a write of the lease sent at `sent` that stored `revision`.
    fn held(&self, token: u64, revision: u64, sent: Instant) -> (LeaseState, Option<u64>) {
        let until = self.deadline(sent);
        (LeaseState::Held { token, until }, Some(revision))
    }
}

/// The keeper: every quarter of the time to live (or when woken), renews what this host
/// holds, tries to take what it wants and does not hold, and gives up what no runner wants.
async fn keep(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let (wanted, unwanted): (Vec<_>, Vec<_>) = {
            let claims = inner.claims.lock().expect("lease claims lock");
            claims
                .iter()
                .map(|(n, c)| (n.clone(), c.revision, c.wanted))
                .partition(|(_, _, wanted)| *wanted > 0)
        };
        // Given up first, and only then forgotten, so `release_all` finds what is still
        // held (and a second delete of one revision is refused harmlessly).
        for (name, revision, _) in unwanted {
            if let Some(r) = revision {
                inner.release(&name, r).await;
            }
            let mut claims = inner.claims.lock().expect("lease claims lock");
            if claims.get(&name).is_some_and(|c| c.wanted == 0) {
                claims.remove(&name);
            }
        }
        // All at once, each within a quarter of the time to live, so one slow request
        // cannot make the others miss their deadlines.
        let rounds = wanted.into_iter().map(|(name, revision, _)| {
            let inner = inner.clone();
            async move {
                let limit = inner.ttl / 4;
                let outcome = match tokio::time::timeout(limit, inner.round(&name, revision)).await
                {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            plugin = name,
                            "a lease request took longer than a quarter of the lease's time to live"
                        );
                        (inner.current(&name), revision)
                    }
                };
                (name, outcome)
            }
        });
        for (name, (state, revision)) in futures::future::join_all(rounds).await {
            let orphan = {
                let mut claims = inner.claims.lock().expect("lease claims lock");
                match claims.get_mut(&name) {
                    Some(c) => {
                        c.revision = revision;
                        c.state.send_if_modified(|s| {
                            let changed = *s != state;
                            *s = state;
                            changed
                        });
                        None
                    }
                    // Given up while this round took it (the host is stopping).
                    None => revision,
                }
            };
            if let Some(r) = orphan {
                inner.release(&name, r).await;
            }
        }
        let tick = inner.ttl / 4;
        let wake = inner.wake.notified();
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_key_is_valid_for_every_plugin_name() {
        for name in ["a", "assistant-stats", "math-2", "x-y-z"] {
            assert!(crate::plugin::valid_name(name), "{name}");
            let k = key(name);
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.=/".contains(&b)),
                "{k}"
            );
        }
    }
}

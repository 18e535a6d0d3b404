//! The live bus: wakes subscribers when events are committed.
//!
//! The log is the source of truth; the bus only carries what was already committed. A
//! subscriber holds a cursor (a position). While it keeps up it is fed through a bounded
//! channel routed by its patterns; when it falls behind, the publisher drops its channel
//! instead of waiting, and the subscriber reads the gap from the log. So a slow consumer
//! never loses an event and never blocks an append.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::event::Event;
use crate::log::{EventLog, LogError, ReadFilter};
use crate::pattern::{PatternSet, Router};

/// Events buffered per live subscriber before it is switched to reading from the log.
const LIVE_BUFFER: usize = 1024;
/// Events read from the log per catch-up step.
const CATCH_UP_PAGE: usize = 512;
/// Most events read at once when filling a batch while catching up.
const MAX_CATCH_UP_READ: usize = 4096;

/// Identifies a subscription, for [`Bus::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SubscriptionId(u64);

struct Live {
    tx: mpsc::Sender<Arc<Event>>,
    filter: ReadFilter,
    patterns: PatternSet,
}

struct HubState {
    router: Router<SubscriptionId>,
    live: HashMap<SubscriptionId, Live>,
    /// Every subscription, live or catching up, with its cancel flag.
    subs: HashMap<SubscriptionId, Arc<AtomicBool>>,
    recent: VecDeque<Arc<Event>>,
    by_type: HashMap<String, u64>,
    published: u64,
    resyncs: u64,
}

/// The publishing half of the bus, owned by the log: it is told of every committed event.
pub struct Hub {
    state: Mutex<HubState>,
    head: watch::Sender<u64>,
    next_id: AtomicU64,
    history: usize,
}

/// Counters describing the bus, as seed-style `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct BusStats {
    /// One past the last committed position.
    pub head: u64,
    /// Events published since the host started.
    pub published: u64,
    /// Open subscriptions.
    pub subscriptions: usize,
    /// Times a subscriber fell behind and resumed from the log.
    pub resyncs: u64,
    /// Events published since start, by type.
    pub events_by_type: HashMap<String, u64>,
}

impl Hub {
    /// A hub keeping the last `history` events for [`Bus::history`].
    pub fn new(history: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState {
                router: Router::new(),
                live: HashMap::new(),
                subs: HashMap::new(),
                recent: VecDeque::with_capacity(history.min(65536)),
                by_type: HashMap::new(),
                published: 0,
                resyncs: 0,
            }),
            head: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            history,
        })
    }

    /// Sets the head at start-up, before anything is published.
    pub fn set_head(&self, head: u64) {
        self.head.send_replace(head);
    }

    /// One past the last published position.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Hands committed events (in position order) to subscribers. Never waits on them.
    pub fn publish(&self, events: &[Arc<Event>]) {
        let Some(last) = events.last() else { return };
        let mut st = self.state.lock().expect("bus lock");
        let mut lagging: Vec<SubscriptionId> = Vec::new();
        let mut sent: Vec<SubscriptionId> = Vec::new();
        for e in events {
            let st = &mut *st;
            st.published += 1;
            match st.by_type.get_mut(e.event_type.as_str()) {
                Some(n) => *n += 1,
                None => {
                    st.by_type.insert(e.event_type.as_str().to_owned(), 1);
                }
            }
            if self.history > 0 {
                if st.recent.len() == self.history {
                    st.recent.pop_front();
                }
                st.recent.push_back(e.clone());
            }
            let live = &st.live;
            // A subscription with several matching patterns gets the event once.
            sent.clear();
            st.router.for_each_match(e.event_type.as_str(), |id| {
                let Some(sub) = live.get(id) else { return };
                if sent.contains(id) || lagging.contains(id) || !sub.filter.admits(e) {
                    return;
                }
                sent.push(*id);
                if sub.tx.try_send(e.clone()).is_err() {
                    lagging.push(*id);
                }
            });
        }
        for id in lagging {
            // Dropping the sender tells the subscriber to resume from the log.
            if let Some(live) = st.live.remove(&id) {
                for p in live.patterns.patterns() {
                    st.router.remove(p, &id);
                }
                st.resyncs += 1;
            }
        }
        // Under the lock: a subscriber registering now either was routed these events or
        // sees the new head and reads them from the log.
        self.head.send_replace(last.position + 1);
    }

    /// Routes matching events to a fresh channel for `id`; `None` once it was unsubscribed.
    fn register(
        &self,
        id: SubscriptionId,
        patterns: &PatternSet,
        filter: &ReadFilter,
    ) -> Option<mpsc::Receiver<Arc<Event>>> {
        let (tx, rx) = mpsc::channel(LIVE_BUFFER);
        let mut st = self.state.lock().expect("bus lock");
        if !st.subs.contains_key(&id) {
            return None;
        }
        if let Some(old) = st.live.remove(&id) {
            for p in old.patterns.patterns() {
                st.router.remove(p, &id);
            }
        }
        for p in patterns.patterns() {
            st.router.insert(p, id);
        }
        st.live.insert(
            id,
            Live {
                tx,
                filter: filter.clone(),
                patterns: patterns.clone(),
            },
        );
        Some(rx)
    }

    fn remove(&self, id: SubscriptionId) -> bool {
        let mut st = self.state.lock().expect("bus lock");
        if let Some(live) = st.live.remove(&id) {
            for p in live.patterns.patterns() {
                st.router.remove(p, &id);
            }
        }
        match st.subs.remove(&id) {
            Some(cancelled) => {
                cancelled.store(true, Ordering::Release);
                true
            }
            None => false,
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only events committed after subscribing.
    Head,
    /// Every matching event from this position on (earlier ones are read from the log).
    Position(u64),
}

/// The consuming half of the bus: subscriptions, waits, history and stats.
#[derive(Clone)]
pub struct Bus {
    log: Arc<dyn EventLog>,
    hub: Arc<Hub>,
}

impl Bus {
    /// A bus over `log`, fed by `hub` (the hub the log publishes to).
    pub fn new(log: Arc<dyn EventLog>, hub: Arc<Hub>) -> Self {
        Self { log, hub }
    }

    /// Subscribes to events matching `patterns` and `filter` (its `types` is ignored in
    /// favour of `patterns`), from `start` on.
    pub fn subscribe(
        &self,
        patterns: PatternSet,
        filter: ReadFilter,
        start: Start,
    ) -> Subscription {
        let id = SubscriptionId(self.hub.next_id.fetch_add(1, Ordering::Relaxed));
        let cancelled = Arc::new(AtomicBool::new(false));
        self.hub
            .state
            .lock()
            .expect("bus lock")
            .subs
            .insert(id, cancelled.clone());
        let cursor = match start {
            Start::Head => self.hub.head(),
            Start::Position(p) => p,
        };
        let filter = ReadFilter {
            types: Some(patterns.clone()),
            ..filter
        };
        // Routed from now on; anything committed before is read from the log.
        let live = self.hub.register(id, &patterns, &filter);
        Subscription {
            id,
            bus: self.clone(),
            patterns,
            filter,
            cursor,
            pending: VecDeque::new(),
            live,
            caught_up: false,
            cancelled,
        }
    }

    /// Ends a subscription; its stream finishes. Returns whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.hub.remove(id)
    }

    /// Waits for the next event matching `patterns` and `filter`, committed after this call;
    /// `None` when `timeout` passes first.
    pub async fn wait_for(
        &self,
        patterns: PatternSet,
        filter: ReadFilter,
        timeout: Duration,
    ) -> Result<Option<Arc<Event>>, LogError> {
        let mut sub = self.subscribe(patterns, filter, Start::Head);
        match tokio::time::timeout(timeout, sub.next()).await {
            Ok(Some(r)) => r.map(Some),
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// The most recent committed events passing `filter`, newest first.
    pub fn history(&self, filter: &ReadFilter, limit: usize) -> Vec<Arc<Event>> {
        let st = self.hub.state.lock().expect("bus lock");
        st.recent
            .iter()
            .rev()
            .filter(|e| filter.admits(e))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Counters: head, events published, subscriptions, resyncs, events by type.
    pub fn stats(&self) -> BusStats {
        let st = self.hub.state.lock().expect("bus lock");
        BusStats {
            head: self.hub.head(),
            published: st.published,
            subscriptions: st.subs.len(),
            resyncs: st.resyncs,
            events_by_type: st.by_type.clone(),
        }
    }

    /// One past the last committed position.
    pub fn head(&self) -> u64 {
        self.hub.head()
    }
}

/// A stream of committed events in position order, with none missed and none repeated.
pub struct Subscription {
    id: SubscriptionId,
    bus: Bus,
    patterns: PatternSet,
    filter: ReadFilter,
    /// One past the last position examined.
    cursor: u64,
    pending: VecDeque<Arc<Event>>,
    live: Option<mpsc::Receiver<Arc<Event>>>,
    /// Read the log up to the head since the channel was registered: the channel now
    /// carries everything later.
    caught_up: bool,
    cancelled: Arc<AtomicBool>,
}

impl Subscription {
    /// The id to pass to [`Bus::unsubscribe`].
    pub fn id(&self) -> SubscriptionId {
        self.id
    }

    /// One past the last position this subscription has examined: resume from here.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The next matching event; `None` once unsubscribed.
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, LogError>> {
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return None;
            }
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            if self.live.is_none() {
                // Register first, then read the log up to the head: every later event is
                // then in the channel, or the channel is dropped and we come back here.
                self.live = self.bus.hub.register(self.id, &self.patterns, &self.filter);
                self.caught_up = false;
                if self.live.is_none() {
                    return None;
                }
            }
            if !self.caught_up {
                if self.cursor < self.bus.hub.head() {
                    match self
                        .bus
                        .log
                        .read(self.cursor, CATCH_UP_PAGE, &self.filter)
                        .await
                    {
                        Ok(page) => {
                            self.cursor = self.cursor.max(page.next);
                            self.pending.extend(page.events.into_iter().map(Arc::new));
                            continue;
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                self.caught_up = true;
            }
            let rx = self.live.as_mut().expect("registered above");
            match rx.recv().await {
                Some(e) if e.position >= self.cursor => {
                    self.cursor = e.position + 1;
                    return Some(Ok(e));
                }
                // Already read from the log while catching up.
                Some(_) => continue,
                // Fell behind, or unsubscribed: resume from the log (or end).
                None => self.live = None,
            }
        }
    }

    /// When nothing is waiting to be delivered, moves the cursor to the head (every matching
    /// event before it was delivered) and returns it; `None` while events are waiting.
    pub fn settle(&mut self) -> Option<u64> {
        // The head is read first: any matching event below it was routed to the channel
        // before the head moved, so an empty channel now means none is outstanding.
        let head = self.bus.hub.head();
        let idle = self.caught_up
            && self.pending.is_empty()
            && self.live.as_ref().is_some_and(|rx| rx.is_empty());
        if !idle {
            return None;
        }
        self.cursor = self.cursor.max(head);
        Some(self.cursor)
    }

    /// Waits for the next matching event, then takes every further one available without
    /// waiting, up to `max`. Returns the events and the position to resume from after them.
    pub async fn next_batch(
        &mut self,
        max: usize,
    ) -> Option<Result<(Vec<Arc<Event>>, u64), LogError>> {
        let first = match self.next().await? {
            Ok(e) => e,
            Err(e) => return Some(Err(e)),
        };
        // While catching up, read on from the log until the batch can be full. The events
        // wait in `pending` across each read, so a caller that gives up waiting (a timeout
        // dropping this future) loses none of them.
        self.pending.push_front(first);
        while !self.caught_up
            && self.pending.len() < max
            && self.cursor < self.bus.hub.head()
            && !self.cancelled.load(Ordering::Acquire)
        {
            let want = (max - self.pending.len()).min(MAX_CATCH_UP_READ);
            match self.bus.log.read(self.cursor, want, &self.filter).await {
                Ok(page) if page.next > self.cursor || !page.events.is_empty() => {
                    self.cursor = self.cursor.max(page.next);
                    self.pending.extend(page.events.into_iter().map(Arc::new));
                }
                // Nothing more to read now, or a read error that the next call reports.
                _ => break,
            }
        }
        let take = self.pending.len().min(max);
        let mut events: Vec<Arc<Event>> = self.pending.drain(..take).collect();
        while events.len() < max && self.caught_up {
            let Some(rx) = self.live.as_mut() else { break };
            match rx.try_recv() {
                Ok(e) if e.position >= self.cursor => {
                    self.cursor = e.position + 1;
                    events.push(e);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let resume = match self.pending.front() {
            Some(e) => e.position,
            None => self.cursor,
        };
        Some(Ok((events, resume)))
    }

    /// Turns the subscription into a `Stream`.
    pub fn into_stream(self) -> impl Stream<Item = Result<Arc<Event>, LogError>> + Send {
        futures::stream::unfold(self, |mut sub| async move {
            sub.next().await.map(|item| (item, sub))
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.hub.remove(self.id);
    }
}

//! The live bus: wakes subscribers when events are committed.
//!
//! The log is the source of truth; the bus only carries what was already committed. A
//! subscriber holds a cursor (a position). While it keeps up it is fed through a bounded
//! channel routed by its patterns; when it falls behind, the publisher drops its channel
//! instead of waiting, and the subscriber reads the gap from the log. So a slow consumer
//! never loses an event and never blocks an append.
//!
//! Publishing runs on the log's writer, so it does little per event: it routes each event
//! *type* of an append once, and hands each matching subscriber the append's events as one
//! shared batch; the subscriber picks out its events (pattern, filter) on its own task. The
//! cost of an append is linear in its events plus the subscribers it wakes, never their
//! product. Memory is bounded in bytes as well as events: the history, each subscriber's
//! queue of batches, and what a subscription reads ahead from the log.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::event::Event;
use crate::limits::stored_bytes;
use crate::log::{EventLog, LogError, ReadFilter};
use crate::pattern::{PatternSet, Router};

mod prefetch;

use prefetch::{Page, Prefetch};

/// Batches of evicted history waiting for the reaper; past this the publisher frees its
/// own, so what waits to be freed stays bounded: 16 publishes' worth queued, one being
/// freed.
const REAPER_QUEUE: usize = 16;
/// A publish of fewer events than this frees what it evicts itself: cheaper than waking
/// the reaper (a lone writer's one-event appends never do).
const REAP_AT: usize = 64;

/// Frees `events` on the reaper thread, or here when the reaper is behind or could not
/// start.
fn reap(events: Vec<Arc<Event>>) {
    static REAPER: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Vec<Arc<Event>>>>> =
        std::sync::OnceLock::new();
    if events.is_empty() {
        return;
    }
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Arc<Event>>>(REAPER_QUEUE);
        std::thread::Builder::new()
            .name("evhost-reaper".into())
            .spawn(move || rx.into_iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = reaper {
        // Full or gone: the events come back and are freed here.
        let _ = tx.try_send(events);
    }
}

/// Events buffered per live subscriber before it is switched to reading from the log.
const LIVE_BUFFER: usize = 1024;
/// Bytes of appends buffered per live subscriber before it is switched to reading from the
/// log (a batch counts whole: that is the memory it holds on to).
const LIVE_BUFFER_BYTES: usize = 16 << 20;
/// Events read from the log per catch-up step.
const CATCH_UP_PAGE: usize = 512;
/// Most events read at once when filling a batch while catching up.
const MAX_CATCH_UP_READ: usize = 4096;
/// Bytes of events a subscription holds read ahead from the log while catching up (waiting
/// in it and being read, together); the next read asks for as many events as fit, sized by
/// the largest event of the previous read. A batch handed out no longer counts.
const CATCH_UP_BYTES: usize = 16 << 20;
/// The size assumed for events before a subscription has read any (the log's default
/// event limit), so its first read asks for few.
const FIRST_EVENT_GUESS: usize = 1 << 20;
/// Bytes the bus's history keeps by default (`--history-mb`).
pub const DEFAULT_HISTORY_BYTES: usize = 64 << 20;

/// Identifies a subscription, for [`Bus::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SubscriptionId(u64);

/// The events of one publish, shared by every subscriber they are routed to.
struct Published {
    events: Vec<Arc<Event>>,
}

/// What a live subscriber's channel carries: a published batch, with the events and bytes
/// it counted against the subscriber's buffer (given back when it is taken).
struct Delivery {
    batch: Arc<Published>,
    events: usize,
    bytes: usize,
}

/// Events and bytes delivered to a subscriber and not yet taken.
#[derive(Default)]
struct Queued {
    events: AtomicUsize,
    bytes: AtomicUsize,
}

struct Live {
    tx: mpsc::UnboundedSender<Delivery>,
    queued: Arc<Queued>,
    patterns: PatternSet,
    /// The publish this subscriber was last picked for, and the events it matched there:
    /// a subscriber with several matching patterns counts each event once.
    picked: Cell<u64>,
    matched: Cell<usize>,
    /// The event type (of the current publish) last counted in `matched`.
    counted: Cell<u64>,
}

struct HubState {
    router: Router<SubscriptionId>,
    live: HashMap<SubscriptionId, Live>,
    /// Every subscription, live or catching up, with its cancel flag.
    subs: HashMap<SubscriptionId, Arc<AtomicBool>>,
    recent: VecDeque<(Arc<Event>, usize)>,
    /// Bytes of the events in `recent`.
    recent_bytes: usize,
    by_type: HashMap<String, u64>,
    published: u64,
    resyncs: u64,
    /// Stamps publishes and the event types in them, to mark the subscribers picked.
    generation: u64,
}

/// The publishing half of the bus, owned by the log: it is told of every committed event.
pub struct Hub {
    state: Mutex<HubState>,
    head: watch::Sender<u64>,
    next_id: AtomicU64,
    history: usize,
    history_bytes: usize,
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
    /// A hub keeping the last `history` events for [`Bus::history`], at most
    /// [`DEFAULT_HISTORY_BYTES`] of them.
    pub fn new(history: usize) -> Arc<Self> {
        Self::with_history_bytes(history, DEFAULT_HISTORY_BYTES)
    }

    /// A hub keeping the last `history` events for [`Bus::history`], and fewer when they
    /// hold more than `history_bytes`: the oldest leave first.
    pub fn with_history_bytes(history: usize, history_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState {
                router: Router::new(),
                live: HashMap::new(),
                subs: HashMap::new(),
                recent: VecDeque::with_capacity(history.min(4096)),
                recent_bytes: 0,
                by_type: HashMap::new(),
                published: 0,
                resyncs: 0,
                generation: 0,
            }),
            head: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            history,
            history_bytes,
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

    /// Drops the events of `stream` from the history kept in memory, once they have been
    /// erased from the log: no read of the bus shows them again.
    pub fn forget_stream(&self, stream: &str) {
        let mut st = self.state.lock().expect("bus lock");
        let st = &mut *st;
        let mut freed = 0;
        st.recent.retain(|(e, size)| {
            let keep = e.stream != stream;
            if !keep {
                freed += *size;
            }
            keep
        });
        st.recent_bytes -= freed;
    }

    /// Hands committed events (in position order) to subscribers. Never waits on them.
    ///
    /// Linear in the events plus the subscribers woken: each distinct event type is routed
    /// once, and each subscriber it matches gets the whole batch once (it filters on its
    /// own task).
    pub fn publish(&self, events: &[Arc<Event>]) {
        let Some(last) = events.last() else { return };
        let sizes: Vec<usize> = events.iter().map(|e| stored_bytes(e)).collect();
        let bytes: usize = sizes.iter().sum();
        // Events per type, counted before taking the lock.
        let mut types: HashMap<&str, usize> = HashMap::new();
        for e in events {
            *types.entry(e.event_type.as_str()).or_default() += 1;
        }
        // Built for the first subscriber it goes to: an append nobody follows live costs
        // no copy.
        let mut batch: Option<Arc<Published>> = None;
        // What a large publish pushes out of the history is freed after the lock, and off
        // the publisher's thread while the reaper keeps up: freeing those events costs more
        // than publishing them. A small publish frees the few it evicts as it goes.
        let reaping = events.len() >= REAP_AT;
        let mut evicted: Vec<Arc<Event>> = Vec::new();
        let mut guard = self.state.lock().expect("bus lock");
        let st = &mut *guard;
        st.published += events.len() as u64;
        for (ty, n) in &types {
            match st.by_type.get_mut(*ty) {
                Some(c) => *c += *n as u64,
                None => {
                    st.by_type.insert((*ty).to_owned(), *n as u64);
                }
            }
        }
        if self.history > 0 {
            for (e, size) in events.iter().zip(&sizes) {
                st.recent.push_back((e.clone(), *size));
                st.recent_bytes += size;
            }
            while st.recent.len() > self.history
                || (st.recent_bytes > self.history_bytes && !st.recent.is_empty())
            {
                if let Some((e, size)) = st.recent.pop_front() {
                    st.recent_bytes -= size;
                    if reaping {
                        evicted.push(e);
                    }
                }
            }
        }
        st.generation += 1;
        let generation = st.generation;
        let live = &st.live;
        let mut picked: Vec<SubscriptionId> = Vec::new();
        let mut tick = generation;
        for (ty, n) in &types {
            // Stamps, not searches: a subscriber is picked once per publish, and counts a
            // type once however many of its patterns match it.
            tick += 1;
            st.router.for_each_match(ty, |id| {
                let Some(sub) = live.get(id) else { return };
                if sub.picked.get() != generation {
                    sub.picked.set(generation);
                    sub.matched.set(0);
                    picked.push(*id);
                }
                if sub.counted.get() != tick {
                    sub.counted.set(tick);
                    sub.matched.set(sub.matched.get() + n);
                }
            });
        }
        st.generation = tick;
        let mut lagging: Vec<SubscriptionId> = Vec::new();
        for id in picked {
            let sub = &live[&id];
            let matched = sub.matched.get();
            let queued_events = sub.queued.events.load(Ordering::Acquire);
            let queued_bytes = sub.queued.bytes.load(Ordering::Acquire);
            // An idle subscriber takes any batch (it is shared, so it costs one copy of the
            // append); a busy one only while its buffer has room.
            let busy = queued_events > 0 || queued_bytes > 0;
            if busy
                && (queued_events + matched > LIVE_BUFFER
                    || queued_bytes + bytes > LIVE_BUFFER_BYTES)
            {
                lagging.push(id);
                continue;
            }
            sub.queued.events.fetch_add(matched, Ordering::AcqRel);
            sub.queued.bytes.fetch_add(bytes, Ordering::AcqRel);
            let batch = batch.get_or_insert_with(|| {
                Arc::new(Published {
                    events: events.to_vec(),
                })
            });
            let delivery = Delivery {
                batch: batch.clone(),
                events: matched,
                bytes,
            };
            if sub.tx.send(delivery).is_err() {
                lagging.push(id);
            }
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
        drop(guard);
        reap(evicted);
    }

    /// Routes matching events to a fresh channel for `id`; `None` once it was unsubscribed.
    fn register(&self, id: SubscriptionId, patterns: &PatternSet) -> Option<LiveRx> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(Queued::default());
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
                queued: queued.clone(),
                patterns: patterns.clone(),
                picked: Cell::new(0),
                matched: Cell::new(0),
                counted: Cell::new(0),
            },
        );
        Some(LiveRx { rx, queued })
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
        let live = self.hub.register(id, &patterns);
        Subscription {
            id,
            bus: self.clone(),
            patterns,
            filter,
            cursor,
            pending: VecDeque::new(),
            pending_bytes: 0,
            event_size: FIRST_EVENT_GUESS,
            live,
            caught_up: false,
            cancelled,
            read_failures: 0,
            ahead: None,
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
            .map(|(e, _)| e)
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

/// The receiving end of a live subscriber's channel, with its buffer counts.
struct LiveRx {
    rx: mpsc::UnboundedReceiver<Delivery>,
    queued: Arc<Queued>,
}

/// A stream of committed events in position order, with none missed and none repeated.
pub struct Subscription {
    id: SubscriptionId,
    bus: Bus,
    patterns: PatternSet,
    filter: ReadFilter,
    /// One past the last position examined.
    cursor: u64,
    /// Events examined and matching, not yet delivered.
    pending: VecDeque<(Arc<Event>, usize)>,
    /// Bytes of the events in `pending`.
    pending_bytes: usize,
    /// The largest event of the last read from the log: sizes the next read.
    event_size: usize,
    live: Option<LiveRx>,
    /// Read the log up to the head since the channel was registered: the channel now
    /// carries everything later.
    caught_up: bool,
    cancelled: Arc<AtomicBool>,
    /// Log reads that failed in a row (a damaged chunk, a storage fault): the next read
    /// waits longer each time, so a reader stuck on one never spins.
    read_failures: u32,
    /// The next catch-up read, started when a batch was handed out.
    ahead: Option<Prefetch>,
}

/// The wait before a log read after `failures` failed ones in a row: 50 ms doubling, at
/// most 5 s.
fn read_backoff(failures: u32) -> Duration {
    Duration::from_millis(50u64 << failures.saturating_sub(1).min(7)).min(Duration::from_secs(5))
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

    fn pop_pending(&mut self) -> Option<Arc<Event>> {
        let (e, size) = self.pending.pop_front()?;
        self.pending_bytes -= size;
        Some(e)
    }

    fn push_pending(&mut self, e: Arc<Event>) {
        let size = stored_bytes(&e);
        self.push_sized(e, size);
    }

    fn push_sized(&mut self, e: Arc<Event>, size: usize) {
        self.pending_bytes += size;
        self.pending.push_back((e, size));
    }

    /// How many events a read may ask for when `want` are wanted: as many as fit in what
    /// is left of [`CATCH_UP_BYTES`].
    fn fitting(&self, want: usize) -> usize {
        let room = CATCH_UP_BYTES.saturating_sub(self.pending_bytes);
        want.min(room / self.event_size.max(1)).max(1)
    }

    /// Reads from the log at the cursor, up to `want` events and about as many as fit in
    /// what is left of [`CATCH_UP_BYTES`]; keeps what matches in `pending`. A read started
    /// ahead from the cursor is taken instead.
    async fn read_ahead(&mut self, want: usize) -> Result<bool, LogError> {
        let prefetched = match &mut self.ahead {
            Some(p) if p.from() == self.cursor => Some(p.page().await),
            _ => None,
        };
        self.ahead = None;
        let page = match prefetched {
            Some(page) => page,
            None => {
                let want = self.fitting(want);
                if self.read_failures > 0 {
                    tokio::time::sleep(read_backoff(self.read_failures)).await;
                }
                self.bus
                    .log
                    .read(self.cursor, want, &self.filter)
                    .await
                    .map(Page::from)
            }
        };
        let page = match page {
            Ok(page) => {
                self.read_failures = 0;
                page
            }
            Err(e) => {
                self.read_failures = self.read_failures.saturating_add(1);
                return Err(e);
            }
        };
        let progressed = page.next > self.cursor || !page.events.is_empty();
        self.cursor = self.cursor.max(page.next);
        let mut largest = 0;
        for (e, size) in page.events {
            largest = largest.max(size);
            self.push_sized(e, size);
        }
        if largest > 0 {
            self.event_size = largest;
        }
        Ok(progressed)
    }

    /// While catching up, starts reading what the next batch needs from the log, so the
    /// read runs while the caller handles the batch it was just given.
    fn read_on(&mut self, max: usize) {
        let wanted = self.pending.len() < max
            && !self.caught_up
            && self.ahead.is_none()
            && self.read_failures == 0
            && self.cursor < self.bus.hub.head()
            && !self.cancelled.load(Ordering::Acquire);
        if wanted {
            let want = self.fitting((max - self.pending.len()).min(MAX_CATCH_UP_READ));
            self.ahead =
                Prefetch::start(self.bus.log.clone(), self.cursor, want, self.filter.clone());
        }
    }

    /// Takes the events of a delivered batch this subscription has not examined and that
    /// match it into `pending`; gives its share of the live buffer back.
    fn absorb(&mut self, d: Delivery) {
        if let Some(live) = &self.live {
            live.queued.events.fetch_sub(d.events, Ordering::AcqRel);
            live.queued.bytes.fetch_sub(d.bytes, Ordering::AcqRel);
        }
        let Some(last) = d.batch.events.last() else {
            return;
        };
        if last.position < self.cursor {
            // Already read from the log while catching up.
            return;
        }
        for e in &d.batch.events {
            if e.position >= self.cursor && self.filter.admits(e) {
                self.push_pending(e.clone());
            }
        }
        self.cursor = last.position + 1;
    }

    /// The next matching event; `None` once unsubscribed.
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, LogError>> {
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return None;
            }
            if let Some(e) = self.pop_pending() {
                return Some(Ok(e));
            }
            if self.live.is_none() {
                // Register first, then read the log up to the head: every later event is
                // then in the channel, or the channel is dropped and we come back here.
                self.live = self.bus.hub.register(self.id, &self.patterns);
                self.caught_up = false;
                self.live.as_ref()?;
            }
            if !self.caught_up {
                if self.cursor < self.bus.hub.head() {
                    match self.read_ahead(CATCH_UP_PAGE).await {
                        Ok(_) => continue,
                        Err(e) => return Some(Err(e)),
                    }
                }
                self.caught_up = true;
            }
            let live = self.live.as_mut().expect("registered above");
            match live.rx.recv().await {
                Some(d) => self.absorb(d),
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
            && self.live.as_ref().is_some_and(|l| l.rx.is_empty());
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
        // While catching up, read on from the log until the batch can be full (or what is
        // read ahead reaches its byte budget). The events wait in `pending` across each
        // read, so a caller that gives up waiting (a timeout dropping this future) loses
        // none of them.
        let size = stored_bytes(&first);
        self.pending_bytes += size;
        self.pending.push_front((first, size));
        while !self.caught_up
            && self.pending.len() < max
            && self.pending_bytes < CATCH_UP_BYTES
            && self.cursor < self.bus.hub.head()
            && !self.cancelled.load(Ordering::Acquire)
        {
            let want = (max - self.pending.len()).min(MAX_CATCH_UP_READ);
            match self.read_ahead(want).await {
                Ok(true) => {}
                // Nothing more to read now, or a read error that the next call reports.
                _ => break,
            }
        }
        let mut events: Vec<Arc<Event>> = Vec::new();
        loop {
            while events.len() < max {
                let Some(e) = self.pop_pending() else { break };
                events.push(e);
            }
            if events.len() >= max || !self.caught_up {
                break;
            }
            let Some(live) = self.live.as_mut() else {
                break;
            };
            match live.rx.try_recv() {
                Ok(d) => self.absorb(d),
                Err(_) => break,
            }
        }
        let resume = match self.pending.front() {
            Some((e, _)) => e.position,
            None => self.cursor,
        };
        self.read_on(max);
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

impl crate::log::CommitSink for Hub {
    fn opened(&self, head: u64) {
        self.set_head(head);
    }

    fn committed(&self, events: &[Arc<Event>]) {
        self.publish(events);
    }

    fn erased(&self, stream: &str) {
        self.forget_stream(stream);
    }
}

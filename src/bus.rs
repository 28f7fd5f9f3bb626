//! The one fan-out point for task events.
//!
//! The store publishes every committed event here, in `seq` order. A watcher
//! subscribes *before* it reads the backlog from the store, then drops live
//! events the backlog already covered. Each watcher has its own bounded output
//! channel, so a slow one never slows the hub or other watchers: when it falls
//! behind the live buffer it is caught up from the store, without gaps.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::model::{EventFilter, Seq};
use crate::store::Store;

/// Events read from the store per catch-up query.
const CATCH_UP_PAGE: usize = 2048;
/// Events queued per watcher between its task and its gRPC stream.
const WATCHER_QUEUE: usize = 256;
/// Most events handed to the stream at once: a catch-up page, or a burst
/// of live events, goes in chunks (one hand-off and one wake-up per chunk,
/// not per event). The queue holds `WATCHER_QUEUE / CHUNK` chunks.
const CHUNK: usize = 32;

/// Most bytes of encoded events the live buffer holds. An event that would
/// take it past this goes out as a [`Live::Stored`] notice instead, and
/// watchers read it from the store: a burst of large events cannot grow
/// memory by the buffer's length times their size.
pub const MAX_LIVE_BYTES: usize = 32 * 1024 * 1024;

/// What the live buffer carries.
#[derive(Clone)]
enum Live {
    Event(Arc<EncodedEvent>),
    /// Event `seq` is committed but too large for the buffer now: read it
    /// from the store.
    Stored,
}

/// Sizes of the events in the live buffer, oldest first, and their sum.
#[derive(Default)]
struct LiveBytes {
    sizes: std::collections::VecDeque<usize>,
    total: usize,
}

/// Broadcasts committed events to watchers.
pub struct EventBus {
    tx: broadcast::Sender<Live>,
    capacity: usize,
    /// Bytes in the live buffer. A std mutex, taken once per publish.
    bytes: std::sync::Mutex<LiveBytes>,
    watchers: Arc<AtomicUsize>,
}

/// What a watcher's stream yields: events in order, a chunk at a time.
pub type WatchItem = Result<Vec<Queued>>;

/// Most bytes of large events queued for one watcher's stream (at least
/// one event): a slow reader of large events holds this much, not its
/// queue's length times their size.
pub const MAX_WATCHER_QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Events this large count against [`MAX_WATCHER_QUEUE_BYTES`]; smaller
/// ones are bounded by the queue's length (256 × 4 KiB at most).
const LARGE_EVENT_BYTES: usize = 4 * 1024;

/// An event queued for a watcher, holding its share of the watcher's room
/// until the stream takes it.
pub struct Queued {
    pub event: Arc<EncodedEvent>,
    _room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl std::ops::Deref for Queued {
    type Target = EncodedEvent;
    fn deref(&self) -> &EncodedEvent {
        &self.event
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> EventBus {
        let (tx, _) = broadcast::channel(capacity);
        EventBus {
            tx,
            capacity,
            bytes: Default::default(),
            watchers: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Called by the store right after a commit.
    pub fn publish(&self, events: &[Arc<EncodedEvent>]) {
        if self.tx.receiver_count() == 0 {
            return; // Nobody is watching: nothing to keep.
        }
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        for ev in events {
            let size = ev.proto().len() + ev.task_id.len() + ev.agent_id.len();
            let item = if bytes.total + size <= MAX_LIVE_BYTES {
                Live::Event(ev.clone())
            } else {
                Live::Stored
            };
            let kept = if matches!(item, Live::Event(_)) {
                size
            } else {
                0
            };
            bytes.sizes.push_back(kept);
            bytes.total += kept;
            if bytes.sizes.len() > self.capacity {
                let gone = bytes.sizes.pop_front().unwrap_or(0);
                bytes.total -= gone;
            }
            let _ = self.tx.send(item);
        }
    }

    /// Number of open watch streams.
    pub fn watcher_count(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Start a watcher. `after = None`: live events from now on. `Some(n)`:
    /// every stored event with `seq > n`, then live events.
    pub fn watch(
        &self,
        store: Arc<dyn Store>,
        after: Option<Seq>,
        filter: EventFilter,
    ) -> Result<mpsc::Receiver<WatchItem>> {
        // Subscribe before anything is read from the store.
        let live = self.tx.subscribe();
        let head = store.durable_seq();
        let cursor = match after {
            Some(n) if n > head => {
                return Err(Error::CursorAhead { after_seq: n, head });
            }
            Some(n) => {
                check_retained(&*store, n)?;
                n
            }
            None => head,
        };
        let (out, rx) = mpsc::channel(WATCHER_QUEUE / CHUNK);
        let guard = WatcherGuard::new(self.watchers.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let mut w = Watcher {
                store,
                filter,
                cursor,
                out,
                chunk: Vec::new(),
                room: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHER_QUEUE_BYTES / 1024)),
            };
            if let Err(e) = w.run(live).await {
                let _ = w.out.send(Err(e)).await;
            }
        });
        Ok(rx)
    }
}

fn check_retained(store: &dyn Store, after: Seq) -> Result<()> {
    let first = store.first_retained_seq();
    if after.saturating_add(1) < first {
        return Err(Error::OutOfRange {
            after_seq: after,
            first,
        });
    }
    Ok(())
}

struct WatcherGuard(Arc<AtomicUsize>);

impl WatcherGuard {
    fn new(count: Arc<AtomicUsize>) -> WatcherGuard {
        count.fetch_add(1, Ordering::Relaxed);
        WatcherGuard(count)
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Watcher {
    store: Arc<dyn Store>,
    filter: EventFilter,
    /// Last seq handled (sent or filtered out).
    cursor: Seq,
    out: mpsc::Sender<WatchItem>,
    /// Events offered and not yet handed to the stream.
    chunk: Vec<Queued>,
    /// Room in the queue to the stream, in KiB of events.
    room: Arc<tokio::sync::Semaphore>,
}

impl Watcher {
    async fn run(&mut self, mut live: broadcast::Receiver<Live>) -> Result<()> {
        loop {
            if !self.catch_up().await? {
                return Ok(());
            }
            loop {
                let next = tokio::select! {
                    next = live.recv() => next,
                    // The client went away: end now, not at the next matching event.
                    _ = self.out.closed() => return Ok(()),
                };
                let ev = match next {
                    Ok(Live::Event(ev)) => ev,
                    // Too large for the live buffer: from the store.
                    Ok(Live::Stored) => break,
                    // Fell behind the live buffer: read the missed part from the store.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                // The rest of a burst goes in the same chunk (`offer` hands
                // over each chunk that fills).
                let mut ev = ev;
                let from_store = loop {
                    if !self.offer(ev).await {
                        return Ok(());
                    }
                    match live.try_recv() {
                        Ok(Live::Event(next)) => ev = next,
                        Err(broadcast::error::TryRecvError::Empty) => break false,
                        Ok(Live::Stored) | Err(broadcast::error::TryRecvError::Lagged(_)) => {
                            break true
                        }
                        Err(broadcast::error::TryRecvError::Closed) => {
                            self.flush().await;
                            return Ok(());
                        }
                    }
                };
                if !self.flush().await {
                    return Ok(());
                }
                if from_store {
                    break;
                }
            }
        }
    }

    /// Send every stored event after the cursor. False: the client went away.
    /// The next page is read while this one is sent.
    async fn catch_up(&mut self) -> Result<bool> {
        let mut reading = self.read_page(self.cursor);
        loop {
            let page = reading.await.map_err(|e| Error::storage(e.to_string()))??;
            let Some(last) = page.last().map(|ev| ev.seq) else {
                return Ok(true);
            };
            reading = self.read_page(last);
            for ev in page {
                if self.chunk.capacity() == 0 {
                    // A page fills whole chunks: no growing on the way.
                    self.chunk.reserve(CHUNK);
                }
                if !self.offer(Arc::new(ev)).await {
                    return Ok(false);
                }
            }
            if !self.flush().await {
                return Ok(false);
            }
        }
    }

    /// Read the stored events after `after`, one page, on a blocking thread.
    fn read_page(&self, after: Seq) -> tokio::task::JoinHandle<Result<Vec<EncodedEvent>>> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let page = store.read_events(after, CATCH_UP_PAGE)?;
            // Pruned under our feet: the stream would have a hole.
            if page
                .first()
                .is_some_and(|e| Some(e.seq) != after.checked_add(1))
            {
                check_retained(&*store, after)?;
            }
            Ok(page)
        })
    }

    /// Add `ev` to the chunk if it is new and matches; a full chunk goes
    /// to the stream. False: the client went away.
    async fn offer(&mut self, ev: Arc<EncodedEvent>) -> bool {
        if ev.seq <= self.cursor {
            return true;
        }
        self.cursor = ev.seq;
        if !self.filter.matches(&ev.task_id, &ev.agent_id, ev.kind) {
            return true;
        }
        // Small events are bounded by the queue's length alone; only large
        // ones take room (no semaphore on the common path).
        let len = ev.proto().len();
        let room = if len < LARGE_EVENT_BYTES {
            None
        } else {
            // What waits in the chunk goes first: it may hold the room this
            // event waits for.
            if !self.flush().await {
                return false;
            }
            let kib = len.div_ceil(1024).min(MAX_WATCHER_QUEUE_BYTES / 1024) as u32;
            tokio::select! {
                room = self.room.clone().acquire_many_owned(kib) => room.ok(),
                _ = self.out.closed() => return false,
            }
        };
        self.chunk.push(Queued {
            event: ev,
            _room: room,
        });
        if self.chunk.len() >= CHUNK {
            return self.flush().await;
        }
        true
    }

    /// Hand the chunk to the stream. False: the client went away.
    async fn flush(&mut self) -> bool {
        if self.chunk.is_empty() {
            return true;
        }
        // Taken, not replaced: a lone live event allocates for itself alone.
        let chunk = std::mem::take(&mut self.chunk);
        self.out.send(Ok(chunk)).await.is_ok()
    }
}

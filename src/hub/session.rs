//! The hub's handle on one sidecar socket: a bounded outbound queue and a way
//! to close it. The socket's own tasks live in `ws::session`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Notify};

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

/// Close code and reason for a WebSocket close frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// Shared between the hub and the socket's writer.
#[derive(Default)]
pub struct SessionCtl {
    close: Mutex<Option<CloseReason>>,
    notify: Notify,
}

impl SessionCtl {
    /// The close requested for this socket, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.lock().expect("session ctl").clone()
    }

    /// Ask for the socket to be closed with this code (first request wins).
    pub fn request_close(&self, code: u16, reason: &'static str) {
        let mut close = self.close.lock().expect("session ctl");
        if close.is_none() {
            *close = Some(CloseReason { code, reason });
        }
        drop(close);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Wait until someone asks this socket to close.
    pub async fn closed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.close_reason().is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// A cheap, cloneable handle on one sidecar socket.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    tx: mpsc::Sender<String>,
    ctl: Arc<SessionCtl>,
}

impl SessionHandle {
    /// A handle plus the receiving end for the socket's writer.
    pub fn new(queue: usize) -> (SessionHandle, mpsc::Receiver<String>, Arc<SessionCtl>) {
        let (tx, rx) = mpsc::channel(queue);
        let ctl = Arc::new(SessionCtl::default());
        let handle = SessionHandle {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            tx,
            ctl: ctl.clone(),
        };
        (handle, rx, ctl)
    }

    /// Queue a text frame. A sidecar whose queue is full has stopped reading:
    /// it is disconnected rather than buffered without bound.
    pub fn send(&self, msg: String) -> bool {
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(session = self.id, "outbound queue full; disconnecting");
                self.close(1008, "outbound queue full");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Ask the socket to close (queued messages are flushed first).
    pub fn close(&self, code: u16, reason: &'static str) {
        self.ctl.request_close(code, reason);
    }
}

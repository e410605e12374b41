//! The shared update state: at most one install at a time, and its progress published to any
//! number of watchers (the InstallUpdate stream that started it, later Status calls, other
//! streams).
//!
//! This module owns the admission rule (one install) and the publication of snapshots. It never
//! performs an install and never blocks a thread: watchers are futures woken on each change, so
//! an async server can hold many of them. Its synchronisation is checked by a loom model
//! (`RUSTFLAGS="--cfg loom" cargo test --release --lib agent::board`).

#[cfg(loom)]
use loom::sync::{Arc, Mutex};
#[cfg(not(loom))]
use std::sync::{Arc, Mutex};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// What watchers see of one install. `T` is the progress payload (the agent uses its
/// progress/result view; the model test uses integers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot<T> {
    /// Changes on every publication; a watcher waits for a sequence newer than the one it saw.
    pub seq: u64,
    /// Identifies the install (the agent uses "version sha256").
    pub id: String,
    pub running: bool,
    pub state: T,
}

#[derive(Debug)]
struct Inner<T> {
    seq: u64,
    current: Option<Snapshot<T>>,
    waiters: Vec<Waker>,
}

/// The board. Cheap to clone (shared).
#[derive(Debug)]
pub struct Board<T> {
    inner: Arc<Mutex<Inner<T>>>,
}

impl<T> Clone for Board<T> {
    fn clone(&self) -> Self {
        Board {
            inner: self.inner.clone(),
        }
    }
}

/// An install was refused because another one runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an update is already running: {running}; wait for it to finish (osctl status shows it)")]
pub struct Busy {
    pub running: String,
}

/// The right to run the one install. Publishing goes through it; dropping it without
/// [`Ticket::finish`] marks the install as no longer running (its last state stays visible), so
/// a panic or an early return can never leave the board locked.
#[derive(Debug)]
pub struct Ticket<T: Clone> {
    board: Board<T>,
    done: bool,
}

// A poisoned lock only means a publisher panicked mid-update of plain data: keep serving.
#[cfg(not(loom))]
fn guard<T>(m: &Mutex<Inner<T>>) -> std::sync::MutexGuard<'_, Inner<T>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
#[cfg(loom)]
fn guard<T>(m: &Mutex<Inner<T>>) -> loom::sync::MutexGuard<'_, Inner<T>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Clone> Default for Board<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone> Board<T> {
    pub fn new() -> Self {
        Board {
            inner: Arc::new(Mutex::new(Inner {
                seq: 0,
                current: None,
                waiters: Vec::new(),
            })),
        }
    }

    /// Start an install named `id` with initial state `state`, unless one is running.
    pub fn try_begin(&self, id: String, state: T) -> Result<Ticket<T>, Busy> {
        let mut g = guard(&self.inner);
        if let Some(c) = &g.current {
            if c.running {
                return Err(Busy {
                    running: c.id.clone(),
                });
            }
        }
        g.seq += 1;
        g.current = Some(Snapshot {
            seq: g.seq,
            id,
            running: true,
            state,
        });
        let w = std::mem::take(&mut g.waiters);
        drop(g);
        w.into_iter().for_each(Waker::wake);
        Ok(Ticket {
            board: self.clone(),
            done: false,
        })
    }

    /// The latest snapshot, if an install ever started.
    pub fn current(&self) -> Option<Snapshot<T>> {
        guard(&self.inner).current.clone()
    }

    /// Whether an install is running now.
    pub fn is_running(&self) -> bool {
        guard(&self.inner)
            .current
            .as_ref()
            .is_some_and(|c| c.running)
    }

    /// Wait for a snapshot with a sequence number above `seen` (0: any).
    pub fn changed(&self, seen: u64) -> Changed<T> {
        Changed {
            board: self.clone(),
            seen,
        }
    }

    fn publish(&self, running: bool, f: impl FnOnce(&mut T)) {
        let mut g = guard(&self.inner);
        g.seq += 1;
        let seq = g.seq;
        if let Some(c) = g.current.as_mut() {
            f(&mut c.state);
            c.seq = seq;
            c.running = running;
        }
        let w = std::mem::take(&mut g.waiters);
        drop(g);
        w.into_iter().for_each(Waker::wake);
    }
}

impl<T: Clone> Ticket<T> {
    /// Publish a new state of the running install.
    pub fn update(&self, f: impl FnOnce(&mut T)) {
        self.board.publish(true, f);
    }
    /// Publish the final state; the board accepts a new install from now on.
    pub fn finish(mut self, f: impl FnOnce(&mut T)) {
        self.done = true;
        self.board.publish(false, f);
    }
}

impl<T: Clone> Drop for Ticket<T> {
    fn drop(&mut self) {
        if !self.done {
            self.board.publish(false, |_| {});
        }
    }
}

/// Future of [`Board::changed`].
#[derive(Debug)]
pub struct Changed<T> {
    board: Board<T>,
    seen: u64,
}

impl<T: Clone> Future for Changed<T> {
    type Output = Snapshot<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Snapshot<T>> {
        let mut g = guard(&self.board.inner);
        match &g.current {
            Some(c) if c.seq > self.seen => Poll::Ready(c.clone()),
            _ => {
                // Registered under the lock: a publisher either ran before (and we saw its
                // snapshot above) or will run after and wake this waker. No lost wake-up.
                if !g.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    g.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_install_at_a_time_and_ticket_drop_releases() {
        let b: Board<u32> = Board::new();
        let t = b.try_begin("v2 abc".into(), 0).expect("first");
        let e = b.try_begin("v3 def".into(), 0).expect_err("second refused");
        assert_eq!(e.running, "v2 abc");
        assert!(e.to_string().contains("v2 abc"));
        t.update(|s| *s = 5);
        assert_eq!(b.current().map(|c| c.state), Some(5));
        drop(t);
        assert!(!b.is_running());
        let t = b.try_begin("v3 def".into(), 0).expect("free again");
        t.finish(|s| *s = 9);
        let c = b.current().expect("snapshot");
        assert!(!c.running);
        assert_eq!(c.state, 9);
    }

    #[tokio::test]
    async fn watchers_see_every_final_state() {
        let b: Board<u32> = Board::new();
        let w1 = tokio::spawn({
            let b = b.clone();
            async move {
                let mut seen = 0;
                loop {
                    let s = b.changed(seen).await;
                    seen = s.seq;
                    if !s.running {
                        return s.state;
                    }
                }
            }
        });
        tokio::task::yield_now().await;
        let t = b.try_begin("x".into(), 0).expect("begin");
        for i in 1..100 {
            t.update(|s| *s = i);
            tokio::task::yield_now().await;
        }
        t.finish(|s| *s = 1000);
        assert_eq!(w1.await.expect("watcher"), 1000);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::thread;

    /// Two installs race: exactly one is admitted.
    #[test]
    fn racing_begins_admit_exactly_one() {
        loom::model(|| {
            let b: Board<u32> = Board::new();
            let b2 = b.clone();
            let h = thread::spawn(move || b2.try_begin("one".into(), 0));
            let mine = b.try_begin("two".into(), 0);
            let other = h.join().expect("join");
            assert!(
                mine.is_ok() != other.is_ok(),
                "exactly one install must be admitted"
            );
        });
    }

    /// A watcher waiting concurrently with the publisher always sees the final state: no lost
    /// wake-up between its check and its registration.
    #[test]
    fn watcher_never_misses_the_final_state() {
        loom::model(|| {
            let b: Board<u32> = Board::new();
            let t = b.try_begin("u".into(), 0).expect("begin");
            let b2 = b.clone();
            let watcher = thread::spawn(move || {
                loom::future::block_on(async move {
                    let mut seen = 0;
                    loop {
                        let s = b2.changed(seen).await;
                        seen = s.seq;
                        if !s.running {
                            return s.state;
                        }
                    }
                })
            });
            t.update(|s| *s = 1);
            t.finish(|s| *s = 2);
            assert_eq!(watcher.join().expect("join"), 2);
            assert!(b.try_begin("next".into(), 0).is_ok());
        });
    }
}

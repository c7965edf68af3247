//! The backlog: requests queued for the engine that have not yet joined a batch, wherever they
//! wait (the channel to the engine thread, or the batcher's own queues). It is what the
//! autoscaler reads: `finserve_queue_size` (requests), `finserve_queue_inputs` (their inputs)
//! and `finserve_queue_oldest_seconds` (how long the oldest has waited).
//!
//! Each queued input holds a [`WaitingInput`]; dropping it (when the input joins a batch, or is
//! refused, cancelled or failed on the way) takes it out of the backlog, so no path that ends a
//! wait can forget to count it. A request leaves the backlog with its last input.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use crate::metrics::METRICS;

/// The requests waiting for one engine, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    /// Waiting requests by arrival number, with when each arrived.
    waiting: Mutex<BTreeMap<u64, (Instant, SystemTime)>>,
    arrivals: AtomicU64,
    inputs: AtomicUsize,
}

/// One waiting request: how many of its inputs still wait.
#[derive(Debug)]
struct Request {
    backlog: Arc<Backlog>,
    arrival: u64,
    left: AtomicUsize,
}

/// One waiting input of a request; dropping it ends its wait.
#[derive(Debug)]
pub(crate) struct WaitingInput(Arc<Request>);

impl Backlog {
    /// A request of `inputs` inputs arrives: one [`WaitingInput`] per input.
    pub(crate) fn enter(self: &Arc<Self>, inputs: usize) -> Vec<WaitingInput> {
        if inputs == 0 {
            return Vec::new();
        }
        let arrival = self.arrivals.fetch_add(1, Ordering::SeqCst);
        {
            let mut waiting = self.lock();
            waiting.insert(arrival, (Instant::now(), SystemTime::now()));
            publish_oldest(&waiting);
        }
        self.inputs.fetch_add(inputs, Ordering::SeqCst);
        METRICS.queue_size.inc();
        METRICS.queue_inputs.add(inputs as i64);
        let request = Arc::new(Request {
            backlog: self.clone(),
            arrival,
            left: AtomicUsize::new(inputs),
        });
        (0..inputs).map(|_| WaitingInput(request.clone())).collect()
    }

    /// Requests waiting now.
    #[cfg(test)]
    pub(crate) fn requests(&self) -> usize {
        self.lock().len()
    }

    /// Inputs waiting now.
    #[cfg(test)]
    pub(crate) fn inputs(&self) -> usize {
        self.inputs.load(Ordering::SeqCst)
    }

    /// How long the oldest waiting request has waited.
    #[cfg(test)]
    pub(crate) fn oldest(&self) -> Option<std::time::Duration> {
        self.lock().values().next().map(|(at, _)| at.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (Instant, SystemTime)>> {
        // The map stays consistent whatever panicked while holding it: every change is one call.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Publishes when the oldest of `waiting` arrived. Called with the lock held, so that two
/// threads changing the backlog cannot publish in the wrong order.
fn publish_oldest(waiting: &BTreeMap<u64, (Instant, SystemTime)>) {
    crate::metrics::set_oldest_waiting(waiting.values().next().map(|(_, at)| *at));
}

impl Drop for WaitingInput {
    fn drop(&mut self) {
        let request = &self.0;
        let backlog = &request.backlog;
        backlog.inputs.fetch_sub(1, Ordering::SeqCst);
        METRICS.queue_inputs.dec();
        if request.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut waiting = backlog.lock();
            waiting.remove(&request.arrival);
            publish_oldest(&waiting);
            METRICS.queue_size.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_until_its_last_input_leaves() {
        let backlog = Arc::new(Backlog::default());
        let mut first = backlog.enter(3);
        let second = backlog.enter(1);
        assert_eq!((backlog.requests(), backlog.inputs()), (2, 4));
        first.pop();
        first.pop();
        assert_eq!((backlog.requests(), backlog.inputs()), (2, 2));
        drop(second);
        assert_eq!((backlog.requests(), backlog.inputs()), (1, 1));
        assert!(backlog.oldest().is_some());
        drop(first);
        assert_eq!((backlog.requests(), backlog.inputs()), (0, 0));
        assert_eq!(backlog.oldest(), None);
    }
}

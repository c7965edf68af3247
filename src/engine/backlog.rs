//! The backlog: requests queued for the engine that have not yet joined a batch, wherever they
//! wait (the channel to the engine thread, or the batcher's own queues). The interactive
//! backlog is what the autoscaler reads: `finserve_queue_size` (requests),
//! `finserve_queue_inputs` (their inputs) and `finserve_queue_oldest_seconds` (how long the
//! oldest has waited); the batch-priority one (a backfill) has `finserve_batch_queue_*`, so
//! that a backfill does not scale the fleet.
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
    /// Whether it counts batch-priority requests (its own gauges).
    batch: bool,
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
    /// The backlog of batch-priority requests.
    pub(crate) fn batch() -> Self {
        Self {
            batch: true,
            ..Self::default()
        }
    }

    fn gauges(&self) -> (&'static prometheus::IntGauge, &'static prometheus::IntGauge) {
        if self.batch {
            (&METRICS.batch_queue_size, &METRICS.batch_queue_inputs)
        } else {
            (&METRICS.queue_size, &METRICS.queue_inputs)
        }
    }

    /// A request of `inputs` inputs arrives: one [`WaitingInput`] per input.
    pub(crate) fn enter(self: &Arc<Self>, inputs: usize) -> Vec<WaitingInput> {
        if inputs == 0 {
            return Vec::new();
        }
        let arrival = self.arrivals.fetch_add(1, Ordering::SeqCst);
        {
            let mut waiting = self.lock();
            waiting.insert(arrival, (Instant::now(), SystemTime::now()));
            publish_oldest(self.batch, &waiting);
        }
        self.inputs.fetch_add(inputs, Ordering::SeqCst);
        let (size, waiting_inputs) = self.gauges();
        size.inc();
        waiting_inputs.add(inputs as i64);
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
fn publish_oldest(batch: bool, waiting: &BTreeMap<u64, (Instant, SystemTime)>) {
    crate::metrics::set_oldest_waiting(batch, waiting.values().next().map(|(_, at)| *at));
}

impl Drop for WaitingInput {
    fn drop(&mut self) {
        let request = &self.0;
        let backlog = &request.backlog;
        backlog.inputs.fetch_sub(1, Ordering::SeqCst);
        let (size, inputs) = backlog.gauges();
        inputs.dec();
        if request.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            let mut waiting = backlog.lock();
            waiting.remove(&request.arrival);
            publish_oldest(backlog.batch, &waiting);
            size.dec();
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

    #[test]
    fn batch_priority_work_has_gauges_of_its_own() {
        // Only this test uses the batch backlog, so its gauges are this test's alone.
        let backlog = Arc::new(Backlog::batch());
        let waiting = backlog.enter(3);
        assert_eq!(METRICS.batch_queue_size.get(), 1);
        assert_eq!(METRICS.batch_queue_inputs.get(), 3);
        crate::metrics::render().unwrap();
        assert!(METRICS.batch_queue_oldest_seconds.get() >= 0.0);
        drop(waiting);
        assert_eq!(METRICS.batch_queue_size.get(), 0);
        assert_eq!(METRICS.batch_queue_inputs.get(), 0);
    }
}

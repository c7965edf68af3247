//! The engine thread's health, shared by the thread and every [`super::Engine`] handle.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::metrics::METRICS;

/// Whether the engine thread runs, and how many batches in a row have failed (reset by the next
/// success).
#[derive(Debug, Default)]
pub(crate) struct Health {
    alive: AtomicBool,
    failed_in_a_row: AtomicUsize,
}

impl Health {
    pub(crate) fn batch_done(&self, ok: bool) {
        let failed = if ok {
            self.failed_in_a_row.store(0, Ordering::SeqCst);
            0
        } else {
            METRICS.failed_batches.inc();
            self.failed_in_a_row.fetch_add(1, Ordering::SeqCst) + 1
        };
        METRICS.failed_batches_in_a_row.set(failed as i64);
    }

    pub(crate) fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::SeqCst);
        METRICS.engine_up.set(i64::from(alive));
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub(crate) fn failed_in_a_row(&self) -> usize {
        self.failed_in_a_row.load(Ordering::SeqCst)
    }
}

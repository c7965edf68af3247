//! Batch-priority work's CPU-bound preparation (tokenizing a backfill's texts) on threads at the
//! lowest scheduling priority (nice 19). On a machine whose cores are busy, those threads get CPU
//! time only when interactive work leaves some, so a backfill's tokenizing does not delay the
//! interactive requests beside it; on an idle machine they run at full speed.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use tokio::sync::oneshot;

use crate::error::{Error, Result};

type Task = Box<dyn FnOnce() + Send>;

/// The queue of the pool's threads, started on first use (`None` if none could start).
fn pool() -> Option<&'static mpsc::Sender<Task>> {
    static POOL: OnceLock<Option<mpsc::Sender<Task>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = (0..threads)
            .filter(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("finserve-backfill-{i}"))
                    .spawn(move || work(&rx))
                    .map_err(|e| tracing::warn!(error = %e, "cannot start a backfill thread"))
                    .is_ok()
            })
            .count();
        (started > 0).then_some(tx)
    })
    .as_ref()
}

fn work(tasks: &Mutex<mpsc::Receiver<Task>>) {
    lower_priority();
    loop {
        let task = match tasks.lock() {
            Ok(tasks) => tasks.recv(),
            Err(_) => return,
        };
        let Ok(task) = task else { return };
        // A panicking task drops its reply (its caller gets an error); the thread goes on.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(task));
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux the nice value belongs to a thread: this sets this thread's only.
    // SAFETY: plain system calls on the calling thread's own id.
    let failed = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19) != 0
    };
    if failed {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a backfill thread's priority: batch work tokenizes at normal priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// Runs `f` on the low-priority threads, or on the async runtime's blocking pool if they could
/// not start.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let Some(pool) = pool() else {
        return tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::Inference(format!("tokenizer task failed: {e}")))?;
    };
    let (reply, answer) = oneshot::channel();
    pool.send(Box::new(move || {
        let _ = reply.send(f());
    }))
    .map_err(|_| Error::Inference("the backfill threads are gone".into()))?;
    answer
        .await
        .map_err(|_| Error::Inference("a backfill tokenizer task failed".into()))?
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_at_the_lowest_priority_and_a_panic_fails_only_its_task() {
        // SAFETY: reads the calling thread's own nice value.
        let nice = || unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        };
        let before = nice();
        assert_eq!(run(move || Ok(nice())).await.unwrap(), 19);
        assert_eq!(nice(), before, "the caller's priority must not change");
        let failed: Result<()> = run(|| panic!("a task that panics")).await;
        assert!(failed.is_err());
        assert_eq!(run(|| Ok(7)).await.unwrap(), 7);
    }
}

//! The thread pool a run computes on.
//!
//! A training run executes on a worker of its own rayon pool, not on the calling thread. The
//! kernels split work with `rayon::join` and parallel iterators; from inside the pool a split
//! pushes one half onto the worker's own deque, where an idle worker steals it within
//! microseconds. From outside the pool every split would instead inject its work into the pool and
//! put the caller to sleep until it finished: two context switches per matrix product, measured at
//! 10-25 µs each on two cores, which made two threads slower than one at batch 64
//! (docs/performance.md). A pool per run also honours `threads` when one process trains several
//! pipelines (tests, `nash bench`), which rayon's process-wide global pool cannot.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Runs `body` on a worker of a new rayon pool of `threads` threads (one per core when `None`),
/// so that everything `body` computes splits its work across that pool; returns what it returns.
///
/// # Errors
/// When `threads` is `Some(0)` or the operating system refuses to start the threads.
pub fn on_pool<R: Send>(threads: Option<usize>, body: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    if threads == Some(0) {
        anyhow::bail!("threads must be at least 1 (0 is not a thread count)");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .thread_name(|i| format!("nash-compute-{i}"))
        .build()
        .context("starting the compute threads")?;
    let helpers = pool.current_num_threads() - 1;
    Ok(pool.install(|| with_awake_helpers(helpers, body)))
}

/// How long a helper keeps polling for work after its last job before it starts sleeping between
/// polls: longer than the gaps between the parallel regions of a training step, shorter than a
/// checkpoint or an evaluation.
const AWAKE_AFTER_WORK: Duration = Duration::from_millis(2);

/// A helper's pause between polls once it has been idle for [`AWAKE_AFTER_WORK`].
const IDLE_PAUSE: Duration = Duration::from_micros(50);

/// Runs `body` on this worker while the pool's `helpers` other workers poll for the work it
/// splits off, instead of sleeping between splits.
///
/// A rayon worker with nothing to do sleeps after a few microseconds; waking it takes a futex call
/// and, on the virtual machines measured here, tens of microseconds, so a training step whose
/// parallel regions are each tens of microseconds long lost to the wake-ups what the second thread
/// gained (about 7 wake-ups per autoencoder step, and no speed-up from the second thread).
/// Helpers poll with `rayon::yield_now` while work keeps coming, and pause between polls
/// only after [`AWAKE_AFTER_WORK`] without any (evaluation, checkpoints, the end of the run), as
/// OpenMP's spin-wait before blocking does for PyTorch.
fn with_awake_helpers<R: Send>(helpers: usize, body: impl FnOnce() -> R + Send) -> R {
    if helpers == 0 {
        return body();
    }
    let done = AtomicBool::new(false);
    let started = AtomicUsize::new(0);
    rayon::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| {
                started.fetch_add(1, Ordering::AcqRel);
                // Not polling before every helper runs, so that no helper steals another's job
                // (one worker would run both and another none).
                while started.load(Ordering::Acquire) < helpers && !done.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                let mut last_work = Instant::now();
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        last_work = Instant::now();
                    } else if last_work.elapsed() < AWAKE_AFTER_WORK {
                        // Gives the core to any other runnable thread (a machine running more
                        // threads than cores, parallel tests) and returns at once otherwise.
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(IDLE_PAUSE);
                    }
                }
            });
        }
        // The helper jobs sit in this worker's deque until the other workers take them; a split
        // in `body` waiting on this thread could otherwise pop one and poll forever.
        while started.load(Ordering::Acquire) < helpers {
            std::thread::yield_now();
        }
        let _stop = StopOnDrop(&done);
        body()
    })
}

/// Sets the flag when dropped, so that the helpers stop even when the body panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_runs_inside_a_pool_of_the_requested_size() {
        for n in [1, 2, 3] {
            let (inside, threads) = on_pool(Some(n), || {
                (rayon::current_thread_index().is_some(), rayon::current_num_threads())
            })
            .unwrap();
            assert!(inside, "{n} threads: the body ran outside the pool");
            assert_eq!(threads, n);
        }
    }

    #[test]
    fn work_split_in_the_body_runs_on_every_thread_and_the_helpers_stop() {
        for n in [2, 3] {
            let ran_on = on_pool(Some(n), || {
                let seen: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
                // Each item sleeps, so that the splits are taken by the other workers.
                rayon::prelude::ParallelIterator::for_each(
                    rayon::iter::IntoParallelIterator::into_par_iter(0..64),
                    |_| {
                        seen[rayon::current_thread_index().unwrap()].store(true, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(1));
                    },
                );
                seen.iter().filter(|s| s.load(Ordering::Relaxed)).count()
            })
            .unwrap();
            assert_eq!(ran_on, n, "{n} threads");
        }
    }

    #[test]
    fn a_panicking_body_stops_the_helpers_and_the_panic_reaches_the_caller() {
        let outcome = std::panic::catch_unwind(|| on_pool(Some(2), || panic!("the body failed")));
        assert!(outcome.is_err());
    }

    #[test]
    fn zero_threads_is_refused() {
        let err = on_pool(Some(0), || ()).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }
}

//! The thread pool a run computes on.
//!
//! A training run executes on a worker of its own rayon pool, not on the calling thread. The
//! kernels split work with `rayon::join` and gemm's rayon mode; from inside the pool a split
//! pushes one half onto the worker's own deque, where an idle worker steals it within
//! microseconds. From outside the pool every split would instead inject its work into the pool and
//! put the caller to sleep until it finished: two context switches per matrix product, measured at
//! 10-25 µs each on two cores, which made two threads slower than one at batch 64
//! (docs/performance.md). A pool per run also honours `threads` when one process trains several
//! pipelines (tests, `nash bench`), which rayon's process-wide global pool cannot.

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
    Ok(pool.install(body))
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
    fn zero_threads_is_refused() {
        let err = on_pool(Some(0), || ()).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }
}

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
use nash_core::tracing;

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

/// Decides, step by step, whether a training step splits its kernels across the compute pool
/// ([`nash_core::kernels::with_splitting`]), from the measured time of the steps.
///
/// A second thread pays only while handing work between the cores is cheap. On the virtual
/// machines measured here the round trip of a cache line between the two CPUs rises from
/// 60-160 ns to 300-520 ns for seconds to minutes at a time (`nash bench cores`), and a step split
/// across both then runs at half the one-thread speed or less (docs/performance.md). So the
/// governor compares, every few seconds, a few split steps with a few unsplit ones and runs the
/// faster way until the next comparison, or sooner when the split steps slow down. The
/// comparison costs a few steps in the slower way per [`HOLD_SECONDS`] or [`HOLD_STEPS`] steps,
/// whichever is longer: under 1% of the time for the reference workloads.
///
/// Step times come from the caller, so that the decisions are reproducible in tests.
#[derive(Debug)]
pub struct SplitGovernor {
    adaptive: bool,
    phase: Phase,
    /// Steps taken so far, and how many of them were split.
    steps: u64,
    split_steps: u64,
}

/// The first steps run split and unmeasured (buffers are allocated, caches filled): at least
/// this many...
const WARMUP_STEPS: u32 = 3;
/// ...and at least this much step time, in seconds.
const WARMUP_SECONDS: f64 = 0.02;
/// Measured steps per block of a comparison (one block split, one not, compared by their
/// medians) when a step is short. Each block then starts with one more step, unmeasured, that
/// pays for the switch (waking the other thread, moving data between the cores' caches).
const TRIAL_STEPS: usize = 4;
/// Measured steps per block, and no switch step, when a step takes [`LONG_STEP_SECONDS`] or more:
/// the switch is then lost in the step, and a block of slow steps in the slower way is what the
/// comparison costs.
const LONG_TRIAL_STEPS: usize = 2;
/// A step at least this long, in seconds, is long (above).
const LONG_STEP_SECONDS: f64 = 0.02;
/// Unsplit steps must be this much faster than split ones to be chosen: where the cores are
/// close, splitting gains 20-60% on the reference workloads; where they are far apart, it loses
/// half.
const SINGLE_MARGIN: f64 = 0.1;
/// The comparison is repeated after this much step time at least...
const HOLD_SECONDS: f64 = 2.0;
/// ...and after this many steps at least.
const HOLD_STEPS: u64 = 200;
/// While split, a comparison starts at once when the median of the last [`TRIAL_STEPS`] steps
/// is this many times the median the choice was made on.
const SLOWDOWN: f64 = 1.3;

#[derive(Debug)]
enum Phase {
    /// The first steps, split and not measured.
    Warmup { steps_left: u32, seconds_left: f64 },
    /// A comparison: a block of split steps, then one of unsplit steps.
    Trial {
        /// Steps of the comparison taken so far.
        taken: usize,
        /// Unmeasured steps at the start of each block (0 or 1), and measured ones after them.
        switch: usize,
        measured: usize,
        split: Vec<f64>,
        single: Vec<f64>,
    },
    /// Running the chosen way.
    Hold {
        split: bool,
        /// The median step time the choice was made on, in seconds.
        reference: f64,
        /// Step time and steps left before the next comparison.
        seconds_left: f64,
        steps_left: u64,
        /// The last [`TRIAL_STEPS`] step times, oldest first.
        recent: Vec<f64>,
    },
}

impl Phase {
    /// A comparison after a step that took `last_step` seconds.
    fn trial(last_step: f64) -> Phase {
        let (switch, measured) = if last_step >= LONG_STEP_SECONDS {
            (0, LONG_TRIAL_STEPS)
        } else {
            (1, TRIAL_STEPS)
        };
        Phase::Trial {
            taken: 0,
            switch,
            measured,
            split: Vec::with_capacity(measured),
            single: Vec::with_capacity(measured),
        }
    }
}

impl SplitGovernor {
    /// A governor for a pool of `threads` threads; `adaptive = false` (or one thread) splits
    /// every step, as the kernels would without it.
    pub fn new(threads: usize, adaptive: bool) -> Self {
        SplitGovernor {
            adaptive: adaptive && threads > 1,
            phase: Phase::Warmup {
                steps_left: WARMUP_STEPS,
                seconds_left: WARMUP_SECONDS,
            },
            steps: 0,
            split_steps: 0,
        }
    }

    /// Whether the next step may split its kernels across the pool.
    pub fn splitting(&self) -> bool {
        match &self.phase {
            _ if !self.adaptive => true,
            Phase::Warmup { .. } => true,
            Phase::Trial {
                taken,
                switch,
                measured,
                ..
            } => *taken < switch + measured,
            Phase::Hold { split, .. } => *split,
        }
    }

    /// Runs one step, split or not as the governor decides, and records how long it took.
    pub fn step<R>(&mut self, body: impl FnOnce() -> R) -> R {
        let split = self.splitting();
        let start = Instant::now();
        let out = nash_core::kernels::with_splitting(split, body);
        self.record(split, start.elapsed().as_secs_f64());
        out
    }

    /// Records that a step ran (`split` or not) in `seconds`, and decides the next one.
    pub fn record(&mut self, split: bool, seconds: f64) {
        self.steps += 1;
        self.split_steps += u64::from(split);
        if !self.adaptive {
            return;
        }
        match &mut self.phase {
            Phase::Warmup {
                steps_left,
                seconds_left,
            } => {
                *steps_left = steps_left.saturating_sub(1);
                *seconds_left -= seconds;
                if *steps_left == 0 && *seconds_left <= 0.0 {
                    self.phase = Phase::trial(seconds);
                }
            }
            Phase::Trial {
                taken,
                switch,
                measured,
                split: s,
                single,
            } => {
                let block = *switch + *measured;
                // The first steps of each block pay for the switch and are not compared.
                if *taken % block >= *switch {
                    if *taken < block {
                        s.push(seconds);
                    } else {
                        single.push(seconds);
                    }
                }
                *taken += 1;
                if *taken < 2 * block {
                    return;
                }
                let (with, without) = (median(s), median(single));
                let split = without >= with * (1.0 - SINGLE_MARGIN);
                let reference = if split { with } else { without };
                tracing::debug!(
                    "split governor: split steps {:.3} ms, unsplit {:.3} ms: {}",
                    with * 1e3,
                    without * 1e3,
                    if split { "splitting" } else { "not splitting" }
                );
                self.phase = Phase::Hold {
                    split,
                    reference,
                    seconds_left: HOLD_SECONDS,
                    steps_left: HOLD_STEPS,
                    recent: Vec::with_capacity(TRIAL_STEPS),
                };
            }
            Phase::Hold {
                split,
                reference,
                seconds_left,
                steps_left,
                recent,
            } => {
                *seconds_left -= seconds;
                *steps_left = steps_left.saturating_sub(1);
                if recent.len() == TRIAL_STEPS {
                    recent.remove(0);
                }
                recent.push(seconds);
                let slowed = *split && recent.len() == TRIAL_STEPS && median(recent) > *reference * SLOWDOWN;
                if slowed || (*seconds_left <= 0.0 && *steps_left == 0) {
                    self.phase = Phase::trial(seconds);
                }
            }
        }
    }

    /// The share of the steps so far that were split (1 when there were none).
    pub fn split_share(&self) -> f64 {
        if self.steps == 0 {
            1.0
        } else {
            self.split_steps as f64 / self.steps as f64
        }
    }
}

/// The median of a comparison block's or of the last steps' times, which are never empty.
fn median(values: &[f64]) -> f64 {
    crate::median(values.iter().copied()).expect("a comparison block and the last steps hold step times")
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

    /// Runs `steps` steps on `governor` whose times `cost(split, step)` gives; returns whether
    /// each was split.
    fn simulate(governor: &mut SplitGovernor, steps: u64, cost: impl Fn(bool, u64) -> f64) -> Vec<bool> {
        (0..steps)
            .map(|step| {
                let split = governor.splitting();
                governor.record(split, cost(split, step));
                split
            })
            .collect()
    }

    /// The steps of the warmup when each takes `seconds`, counted as the governor counts them.
    fn warmup_len(seconds: f64) -> usize {
        let (mut steps, mut left) = (0, WARMUP_SECONDS);
        while steps < WARMUP_STEPS as usize || left > 0.0 {
            left -= seconds;
            steps += 1;
        }
        steps
    }

    /// The steps per block of a comparison after a step of `seconds`.
    fn block_len(seconds: f64) -> usize {
        if seconds >= LONG_STEP_SECONDS {
            LONG_TRIAL_STEPS
        } else {
            TRIAL_STEPS + 1
        }
    }

    /// The steps before the first choice holds, when split steps take `seconds`: the warmup
    /// (split) and the two blocks of the first comparison.
    fn first_choice(seconds: f64) -> usize {
        warmup_len(seconds) + 2 * block_len(seconds)
    }

    /// Short steps: blocks of [`TRIAL_STEPS`] and a switch step.
    const BLOCK_STEPS: usize = TRIAL_STEPS + 1;

    #[test]
    fn slow_steps_are_compared_in_short_blocks_that_end_within_the_benchmark_warmup() {
        // A DCGAN step: 100 ms split, 160 ms unsplit, then the cores move apart.
        let mut governor = SplitGovernor::new(2, true);
        let steps = simulate(&mut governor, 60, |split, step| match (split, step >= 30) {
            (true, false) => 0.1,
            (true, true) => 0.4,
            (false, _) => 0.16,
        });
        let first = first_choice(0.1);
        // `nash bench speed` and bench/ warm up for 20 steps: the first choice is made well within.
        assert!(first <= 10, "the first choice holds from step {first}");
        assert_eq!(steps[..first], [true, true, true, true, true, false, false]);
        assert!(steps[first..30].iter().all(|&s| s));
        // Two slow steps, a block of two split and one of two unsplit steps.
        assert_eq!(steps[30..36], [true, true, true, true, false, false]);
        assert!(steps[36..].iter().all(|&s| !s));
    }

    #[test]
    fn one_thread_or_a_fixed_setting_splits_every_step() {
        for (threads, adaptive) in [(1, true), (2, false)] {
            let mut governor = SplitGovernor::new(threads, adaptive);
            // Unsplit steps would be ten times faster: ignored.
            let steps = simulate(&mut governor, 500, |split, _| if split { 1e-2 } else { 1e-3 });
            assert!(steps.iter().all(|&s| s), "{threads} threads, adaptive {adaptive}");
            assert_eq!(governor.split_share(), 1.0);
        }
    }

    #[test]
    fn the_faster_way_is_held_after_each_comparison() {
        // Unsplit steps are chosen only when more than SINGLE_MARGIN faster.
        for (split_cost, single_cost, want_split) in [(1e-3, 2e-3, true), (2e-3, 1e-3, false), (1.0e-3, 0.95e-3, true)]
        {
            let mut governor = SplitGovernor::new(2, true);
            let steps = simulate(
                &mut governor,
                6000,
                |split, _| if split { split_cost } else { single_cost },
            );
            let first = first_choice(split_cost);
            assert!(
                steps[first..first + HOLD_STEPS as usize]
                    .iter()
                    .all(|&s| s == want_split),
                "split {split_cost}, unsplit {single_cost}: the first hold is not all {want_split}"
            );
            // About 6-12 s of steps: a comparison per HOLD_SECONDS, each with one block the
            // other way.
            let other = steps[first..].iter().filter(|&&s| s != want_split).count();
            assert!(other <= 6 * BLOCK_STEPS, "{other} steps the other way");
            assert!(
                other >= BLOCK_STEPS,
                "{other} steps the other way: no comparison after the first"
            );
        }
    }

    #[test]
    fn split_steps_that_slow_down_start_a_comparison_at_once() {
        let mut governor = SplitGovernor::new(2, true);
        // The cores move apart at step 400: split steps take three times as long, unsplit ones
        // the same as before.
        let steps = simulate(&mut governor, 800, |split, step| match (split, step >= 400) {
            (true, false) => 1e-3,
            (true, true) => 3e-3,
            (false, _) => 1.5e-3,
        });
        assert!(steps[first_choice(1e-3)..400].iter().all(|&s| s));
        // Two slow steps move the median of the last TRIAL_STEPS, then a split block runs.
        let switched = steps[400..].iter().position(|&s| !s).map(|i| 400 + i);
        assert_eq!(switched, Some(400 + 2 + BLOCK_STEPS));
        assert!(steps[400 + 2 + 2 * BLOCK_STEPS..].iter().all(|&s| !s));
    }

    #[test]
    fn a_comparison_is_repeated_so_that_close_cores_are_used_again() {
        let mut governor = SplitGovernor::new(2, true);
        // Split steps are slow until step 1000, then twice as fast as unsplit ones; an unsplit
        // step takes 10 ms, so a hold lasts HOLD_STEPS steps (2 s of step time).
        let steps = simulate(&mut governor, 2000, |split, step| match (split, step >= 1000) {
            (true, false) => 30e-3,
            (true, true) => 5e-3,
            (false, _) => 10e-3,
        });
        // Before: one split block per comparison, a comparison per HOLD_STEPS steps.
        let split_before = steps[first_choice(30e-3)..1000].iter().filter(|&&s| s).count();
        assert!(
            (LONG_TRIAL_STEPS..=5 * BLOCK_STEPS).contains(&split_before),
            "{split_before} split steps before step 1000"
        );
        let back = steps[1000..].windows(100).position(|w| w.iter().all(|&s| s));
        assert!(
            back.is_some_and(|i| i <= HOLD_STEPS as usize + 2 * BLOCK_STEPS),
            "split again after {back:?} steps"
        );
    }

    #[test]
    fn zero_threads_is_refused() {
        let err = on_pool(Some(0), || ()).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }
}

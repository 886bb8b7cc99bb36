//! `nash bench cores`: how long a cache line takes to travel between two CPUs and back.
//!
//! Every hand-off between compute threads (a stolen half of a split, the data one thread wrote and
//! the other reads) costs this round trip. On the virtual machines measured here it is not fixed:
//! for seconds to minutes at a time it rises from 60-160 ns to 300-520 ns, which looks like the
//! host running the two virtual CPUs on cores that share no cache (or falls to about 30 ns: one
//! core's two hardware threads). In the far periods a two-thread nash step split across both cores
//! ran at half the one-thread speed, the Python peers' slowed less, and one-thread steps did not
//! change (docs/performance.md); the trainer's split governor keeps steps on one core then.
//! `bench/` probes the link before and after each multi-thread measurement so that a comparison is
//! not decided by which side ran in such a period.
//!
//! The probe pins two threads to the first two CPUs this thread may run on and bounces a counter
//! between them: one makes it odd, the other answers by making it even, and the round trip is
//! the time per exchange over short windows; the median window is the result, so that a
//! preemption in one window does not move it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The length of one timed window of the probe.
const WINDOW: Duration = Duration::from_millis(10);

/// What one probe measured.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CoreLink {
    /// The two CPUs the counter travelled between (operating-system numbers).
    pub cpus: [usize; 2],
    /// The median over the windows of the time per round trip, in nanoseconds.
    pub round_trip_ns: f64,
    /// The time per round trip in each window, in nanoseconds.
    pub windows_ns: Vec<f64>,
}

/// Measures the round trip of a cache line between the first two CPUs the calling thread may run
/// on, for about `duration` (at least one window).
///
/// # Errors
/// When the calling thread may run on fewer than two CPUs, when a thread cannot be pinned (or the
/// operating system is not Linux), or when the second CPU never answers.
pub fn measure(duration: Duration) -> anyhow::Result<CoreLink> {
    let allowed = affinity::allowed_cpus()?;
    let [first, second] = match allowed[..] {
        [a, b, ..] => [a, b],
        _ => bail!(
            "the core-link probe needs two CPUs, but this process may run only on CPU {:?} (widen `taskset -c`)",
            allowed
        ),
    };
    let windows = (duration.as_nanos() / WINDOW.as_nanos()).max(1) as usize;
    let counter = CacheLine::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let answerer = scope.spawn(|| -> anyhow::Result<()> {
            affinity::pin_current_thread(second)?;
            while !stop.load(Ordering::Relaxed) {
                let value = counter.0.load(Ordering::Acquire);
                if value % 2 == 1 {
                    counter.0.store(value + 1, Ordering::Release);
                }
                std::hint::spin_loop();
            }
            Ok(())
        });
        let asked = (|| {
            affinity::pin_current_thread(first)?;
            ping_windows(&counter, windows)
        })();
        stop.store(true, Ordering::Relaxed);
        let answered = answerer
            .join()
            .map_err(|_| anyhow::anyhow!("the probe's answering thread panicked"))?;
        answered?;
        let windows_ns = asked?;
        Ok(CoreLink {
            cpus: [first, second],
            // At least one window was timed.
            round_trip_ns: crate::median(windows_ns.iter().copied()).unwrap_or(f64::NAN),
            windows_ns,
        })
    })
}

/// A counter alone on its cache line (64 bytes on the CPUs nash targets; 128 covers the adjacent-
/// line prefetcher pairs too), so that nothing else travels with it.
#[derive(Default)]
#[repr(align(128))]
struct CacheLine(AtomicU64);

/// Bounces the counter for `windows` windows of [`WINDOW`]; returns each window's nanoseconds per
/// round trip.
fn ping_windows(counter: &CacheLine, windows: usize) -> anyhow::Result<Vec<f64>> {
    /// Longer than any preemption of the answering thread: then it is not running at all.
    const NO_ANSWER: Duration = Duration::from_secs(2);
    let mut out = Vec::with_capacity(windows);
    let mut value = counter.0.load(Ordering::Acquire);
    for _ in 0..windows {
        let start = Instant::now();
        let mut trips = 0u64;
        while start.elapsed() < WINDOW {
            // Checks the clock only every 64 trips: reading it costs about as much as a trip.
            for _ in 0..64 {
                counter.0.store(value + 1, Ordering::Release);
                let mut spins = 0u64;
                // Set only once the answer is late, so that a trip reads no clock.
                let mut late_since: Option<Instant> = None;
                loop {
                    let now = counter.0.load(Ordering::Acquire);
                    if now == value + 2 {
                        value = now;
                        break;
                    }
                    spins += 1;
                    if spins.is_multiple_of(1 << 20) {
                        let since = *late_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > NO_ANSWER {
                            bail!("the second CPU did not answer the core-link probe within {NO_ANSWER:?}");
                        }
                    }
                    std::hint::spin_loop();
                }
            }
            trips += 64;
        }
        out.push(start.elapsed().as_nanos() as f64 / trips as f64);
    }
    Ok(out)
}

#[cfg(target_os = "linux")]
mod affinity {
    use super::*;

    /// The CPUs the calling thread may run on, in increasing order.
    pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
        // SAFETY: `set` is a plain bit set that sched_getaffinity fills; its size is passed.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(std::io::Error::last_os_error()).context("reading this thread's CPU affinity");
            }
            Ok((0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect())
        }
    }

    /// Restricts the calling thread to `cpu`.
    pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
        // SAFETY: as above; pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("pinning a thread to CPU {cpu}"));
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod affinity {
    /// Pinning threads is implemented for Linux only.
    pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
        anyhow::bail!("the core-link probe pins threads to CPUs, which nash implements on Linux only")
    }

    /// Pinning threads is implemented for Linux only.
    pub fn pin_current_thread(_cpu: usize) -> anyhow::Result<()> {
        anyhow::bail!("the core-link probe pins threads to CPUs, which nash implements on Linux only")
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_probe_between_two_cpus_gives_a_round_trip_per_window() {
        if affinity::allowed_cpus().unwrap().len() < 2 {
            eprintln!("skipped: this machine lets the test run on one CPU only");
            return;
        }
        let link = measure(Duration::from_millis(50)).unwrap();
        assert_eq!(link.windows_ns.len(), 5);
        assert_ne!(link.cpus[0], link.cpus[1]);
        // A cache line's round trip between cores takes tens to hundreds of nanoseconds; a value
        // outside (10 ns, 100 µs) means the exchange was not timed per trip.
        assert!(link.round_trip_ns > 10.0 && link.round_trip_ns < 100_000.0, "{link:?}");
    }

    #[test]
    fn a_thread_allowed_on_one_cpu_gets_an_error_that_names_it() {
        let message = std::thread::spawn(|| {
            let cpu = affinity::allowed_cpus().unwrap()[0];
            affinity::pin_current_thread(cpu).unwrap();
            measure(Duration::from_millis(10)).unwrap_err().to_string()
        })
        .join()
        .unwrap();
        assert!(
            message.contains("needs two CPUs") && message.contains("taskset"),
            "{message}"
        );
    }
}

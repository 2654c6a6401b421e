//! The thread that runs the model, made a worker of a rayon pool of its own.
//!
//! A decode step runs about sixty parallel loops: every product, the attention, a few
//! conversions. Started from a thread outside rayon's pool, each loop hands all its work to
//! the pool and puts the caller to sleep until the pool is done: a sleep and a wake-up per
//! loop, and on a two-core machine three threads (the caller and two workers, spinning
//! before they sleep) contend for two cores between loops. On a worker of the pool, the
//! caller runs its own share of each loop, takes back any share no other worker has taken
//! yet, and waits only for what another worker is still running.
//!
//! Between two loops the other workers idle for tens of microseconds. Upstream rayon-core
//! puts an idle worker to sleep after a few microseconds, so each loop woke it again; the
//! workspace builds a patched rayon-core whose idle workers circle 2 ms before they sleep
//! (vendor/rayon-core/PATCHES.md), as an OpenMP runtime spins before it blocks.
//!
//! [`join_own_pool`] makes the calling thread worker 0 of such a pool
//! (`rayon::ThreadPoolBuilder::use_current_thread`), with rayon's default thread count
//! (`RAYON_NUM_THREADS`, else one per CPU, the caller included). The pool lives in a
//! thread-local until the thread ends; its other workers end then. Rayon-core 1.13 keeps the
//! caller's worker record (a few hundred bytes and the pool's empty queues) for the rest of
//! the process: one per thread that joins, which is what a scheduler thread or a command's
//! main thread costs.

use std::cell::RefCell;

thread_local! {
    static OWN_POOL: RefCell<Option<rayon::ThreadPool>> = const { RefCell::new(None) };
}

/// Makes the calling thread worker 0 of a rayon pool of its own, unless it already works for
/// one (a pool's worker, or a thread that joined before). Returns whether it joined one now.
/// Where the pool cannot be built (no thread can be started), the thread stays outside and
/// rayon's global pool runs its loops, as before; the reason is logged.
pub fn join_own_pool() -> bool {
    if rayon::current_thread_index().is_some() {
        return false;
    }
    match rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("ecache-worker-{i}"))
        .use_current_thread()
        .build()
    {
        Ok(pool) => {
            OWN_POOL.with(|slot| *slot.borrow_mut() = Some(pool));
            true
        }
        Err(e) => {
            tracing::warn!("running outside a pool of its own: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn a_joined_thread_runs_parallel_loops_in_its_own_pool() {
        std::thread::Builder::new()
            .name("joiner".into())
            .spawn(|| {
                assert_eq!(rayon::current_thread_index(), None);
                assert!(join_own_pool());
                // The caller is worker 0 and the loops run in its pool.
                assert_eq!(rayon::current_thread_index(), Some(0));
                assert!(!join_own_pool(), "a second call keeps the first pool");
                let sum: u64 = (0..100_000u64).into_par_iter().map(|i| i * i).sum();
                assert_eq!(sum, (0..100_000u64).map(|i| i * i).sum::<u64>());
                // Every share runs on the caller or on a worker of its pool (rayon's global
                // workers are unnamed).
                let names: Vec<String> = (0..rayon::current_num_threads() * 16)
                    .into_par_iter()
                    .map(|_| {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        std::thread::current().name().unwrap_or("").to_owned()
                    })
                    .collect();
                assert!(
                    names
                        .iter()
                        .all(|n| n == "joiner" || n.starts_with("ecache-worker-")),
                    "{names:?}"
                );
            })
            .expect("a thread")
            .join()
            .expect("the thread ends cleanly, its pool with it");
    }

    /// Voluntary context switches (sleeps) of thread `tid` of this process so far.
    #[cfg(target_os = "linux")]
    fn sleeps(tid: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))
            .expect("the thread's status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a voluntary_ctxt_switches line")
    }

    /// The pool's other worker does not sleep between loops that leave it idle for less
    /// than rayon-core's spin (the vendored patch, vendor/rayon-core/PATCHES.md: 2 ms).
    /// Upstream's workers get sleepy after 32 yields, a few microseconds on an idle machine,
    /// so each of these loops would wake one: a sleep per loop. (On a loaded machine a
    /// yield can hand the core to another process for a while, so upstream may sleep less
    /// often and pass too. The patched crate fails it only if the caller is held off its
    /// core for over 1 ms in half of the loops.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_worker_stays_awake_between_loops_a_short_gap_apart() {
        use std::time::{Duration, Instant};
        let spin = |d: Duration| {
            let start = Instant::now();
            while start.elapsed() < d {
                std::hint::spin_loop();
            }
        };
        std::thread::spawn(move || {
            join_own_pool();
            if rayon::current_num_threads() < 2 {
                return; // one CPU: no other worker to keep awake
            }
            // The other worker's thread id, as /proc names it.
            let tids = rayon::broadcast(|_| {
                std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name().map(|t| t.to_string_lossy().into_owned()))
            });
            let tid = tids[1].clone().expect("/proc/thread-self");
            let loops = 50;
            let before = sleeps(&tid);
            for _ in 0..loops {
                rayon::join(
                    || spin(Duration::from_micros(50)),
                    || spin(Duration::from_micros(50)),
                );
                spin(Duration::from_millis(1)); // the caller alone: the worker idles
            }
            let slept = sleeps(&tid) - before;
            assert!(
                slept < loops / 2,
                "the worker slept {slept} times over {loops} loops 1 ms apart"
            );
        })
        .join()
        .expect("the test's thread");
    }

    #[test]
    fn a_worker_of_another_pool_stays_where_it_is() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a pool");
        pool.install(|| {
            assert!(!join_own_pool());
            assert_eq!(rayon::current_num_threads(), 1);
        });
    }
}

//! `process::prepare` makes candle's idle elementwise worker sleep instead of spinning. A test
//! binary of its own: candle reads the spin limit once per process, when its first elementwise
//! op starts its pool, so no other test may run an op before this one sets the limit.
#![cfg(target_os = "linux")]

use candle_core::{Device, Tensor};
use std::time::{Duration, Instant};

/// Nanoseconds the threads named `candle-bp-*` have run on a CPU (Linux's schedstat).
fn candle_worker_cpu_ns() -> Option<u64> {
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.starts_with("candle-bp-") {
            let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
            total = Some(total.unwrap_or(0) + ns);
        }
    }
    total
}

/// Between elementwise ops 1 ms apart, candle's worker runs for a small part of the time, not
/// all of it (with candle's default limit of 25,000 spin rounds it spins through most of each
/// gap: 0.92 of the time measured on a 2-core EPYC, against 0.09 with `prepare`). Linux only
/// (it reads schedstat); where candle runs one thread, it checks that candle started no worker.
#[test]
fn candle_workers_sleep_between_ops() {
    // The default is under test, not a limit the environment may set (the test binary has no
    // other thread yet, and no other test).
    std::env::remove_var(simtrans_ops::process::SPIN_LIMIT_VAR);
    let prepared = simtrans_ops::process::prepare();
    assert_eq!(
        prepared.spin_limit,
        simtrans_ops::process::SPIN_LIMIT.to_string()
    );
    let x = Tensor::ones(256 * 1024, candle_core::DType::F32, &Device::Cpu).unwrap();
    let _ = (&x + &x).unwrap(); // starts the pool
    let workers = candle_worker_cpu_ns();
    if candle_core::utils::get_num_threads() == 1 {
        assert!(
            workers.is_none(),
            "candle runs one thread but started a worker"
        );
        return;
    }
    let before = workers.expect(
        "candle runs several threads but no `candle-bp-*` worker was found: its pool changed, \
         so revisit `process::park_idle_workers`",
    );
    let gap = Duration::from_millis(1);
    let start = Instant::now();
    let rounds = 200;
    for _ in 0..rounds {
        let _ = (&x + &x).unwrap();
        std::thread::sleep(gap);
    }
    let wall = start.elapsed();
    let busy = candle_worker_cpu_ns().unwrap() - before;
    let share = busy as f64 / wall.as_nanos() as f64;
    eprintln!("candle's workers ran {share:.3} of {wall:?}");
    assert!(
        share < 0.3,
        "candle's elementwise workers were on a CPU {:.0} % of the time between ops",
        100.0 * share
    );
}

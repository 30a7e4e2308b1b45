//! How a process that trains on the CPU is set up: one call, [`prepare`], first thing in a
//! binary's `main`, before it starts a thread or runs an op. Neither setting changes a value;
//! both decide only where memory comes from and what an idle thread does.
//!
//! **Freed buffers stay in the process** ([`keep_freed_memory`]). Every candle CPU op returns
//! a fresh buffer, and glibc serves buffers above its mmap threshold (128 KiB at first, raised
//! on the fly up to 32 MiB only after such a buffer is freed) with fresh mappings that it unmaps
//! again on free. A demo training step allocates a few hundred MB this way, so every one of
//! those pages is faulted in and zeroed by the kernel, and every unmap flushes the other cores'
//! TLBs: measured with `perf stat -e page-faults` on
//! `cargo run --release -p simtrans-backbone --example bench cpu 10 16` (2-core EPYC), 642,065
//! page faults at 214 training images/s against 87,902 and 291 with the settings below
//! (BENCHMARKS.md, "CPU"). On glibc the mmap threshold is fixed at glibc's maximum (32 MiB on
//! 64-bit targets), so buffers up to that size come from the heap and are reused, and the heap
//! is not trimmed. Other C libraries (musl, macOS, Windows) are left as they are.
//!
//! **Candle's idle elementwise workers sleep soon** ([`park_idle_workers`]). Candle runs its
//! elementwise ops on a pool of its own (`candle_core::utils::barrier_pool`, one thread fewer
//! than the cores, the caller being the last), whose threads spin for up to 25,000 rounds
//! after each op before they sleep, while its matrix products, reductions and this crate's
//! convolution and BatchNorm run on rayon's pool, one thread per core. Between two
//! elementwise ops a step does mostly the latter, so on a 2-core machine the spinning thread
//! takes a core from the two rayon threads that have the work: 15 % of the samples of a
//! `perf record` of the demo's classifier stage were that thread's spin loop. Candle reads
//! the limit once, from `CANDLE_BARRIER_POOL_SPIN_LIMIT`, when its pool starts; this sets it
//! to [`SPIN_LIMIT`] unless the user has set it.

/// The largest mmap threshold glibc accepts on 64-bit targets (half its heap size).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// The environment variable candle reads its barrier pool's spin limit from.
pub const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Spin rounds of an idle candle worker before it sleeps (candle's default is 25,000).
pub const SPIN_LIMIT: u32 = 1000;

/// What [`prepare`] set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Whether the allocator took the settings of [`keep_freed_memory`].
    pub keeps_freed_memory: bool,
    /// The spin limit candle's pool will use (the user's, where set).
    pub spin_limit: String,
}

/// Sets the process up for CPU training (see the module doc); call it first in `main`.
pub fn prepare() -> Prepared {
    Prepared {
        keeps_freed_memory: keep_freed_memory(),
        spin_limit: park_idle_workers(),
    }
}

/// Sets the allocator up to reuse freed buffers. Returns whether the settings were taken;
/// `false` on a C library this does not tune or where glibc refused them.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before the binary
        // starts any thread of its own (and glibc serialises it with the allocator anyway).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Lets candle's idle elementwise workers sleep after [`SPIN_LIMIT`] rounds, unless the user
/// has set [`SPIN_LIMIT_VAR`]; returns the limit in force. It must run before candle's first
/// elementwise op of the process, which starts the pool and reads the variable; and, as
/// setting the environment is, before the process starts a second thread.
pub fn park_idle_workers() -> String {
    match std::env::var(SPIN_LIMIT_VAR) {
        Ok(users) => users,
        Err(_) => {
            let ours = SPIN_LIMIT.to_string();
            std::env::set_var(SPIN_LIMIT_VAR, &ours);
            ours
        }
    }
}

#[cfg(test)]
mod tests {
    /// glibc takes both settings; the process keeps working (a buffer above the threshold and
    /// one below it are allocated, written and freed).
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_settings() {
        assert!(super::keep_freed_memory());
        for n in [1 << 10, 1 << 20, 64 << 20] {
            let v = vec![1u8; n];
            assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), n);
        }
    }
}

//! Keeps freed memory in the process for the next tensor instead of handing it back to the
//! kernel: one call at the start of a binary ([`keep_freed_memory`]).
//!
//! Why: every candle CPU op returns a fresh buffer, and glibc serves buffers above its mmap
//! threshold (128 KiB at first, raised on the fly up to 32 MiB only after such a buffer is freed)
//! with fresh mappings that it unmaps again on free. A demo training step allocates a few hundred
//! MB this way, so every one of those pages is faulted in and zeroed by the kernel, and every
//! unmap flushes the other cores' TLBs: measured with `perf stat -e page-faults` on
//! `cargo run --release -p simtrans-backbone --example bench cpu 10 16` (2-core EPYC), 642,065
//! page faults at 214 training images/s against 87,902 and 291 with the settings below
//! (BENCHMARKS.md, "CPU"). Values do not change: the allocator only decides where a buffer
//! lives, and every op writes its buffer before reading it.
//!
//! On glibc it fixes the mmap threshold at glibc's maximum (32 MiB on 64-bit targets), so
//! buffers up to that size come from the heap and are reused, and stops trimming the heap.
//! Other C libraries (musl, macOS, Windows) are left as they are.

/// The largest mmap threshold glibc accepts on 64-bit targets (half its heap size).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Sets the allocator up to reuse freed buffers (see the module doc). Returns whether the
/// settings were taken; `false` on a C library this does not tune or where glibc refused them.
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

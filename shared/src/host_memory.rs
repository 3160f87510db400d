//! How the host allocator treats a pass's activations on the CPU backend.
//!
//! Each operation of a pass on the CPU allocates its output anew and frees its inputs: at the mid benchmark preset,
//! blocks of 1 to 16 MiB, thousands of times per step. glibc's malloc serves a block above its mmap threshold (128
//! KiB at first, raised to the size of each such block freed, at most 32 MiB) with fresh pages from the kernel, and
//! hands free memory at the top of its heap back to the kernel beyond its trim threshold (twice the mmap threshold).
//! So most activations came back as new pages, which the kernel zeroes on first touch: `clear_page_erms` took 7% of
//! the forward pass's CPU time under `perf`, and a LoRA step ran 1.16x as fast with both thresholds raised (README,
//! "Benchmarks"), at the same peak memory.

/// Freed blocks up to this size stay with the allocator for reuse: above a gemma-2-2b activation at 8 × 512 tokens
/// (`[8, 512, 9216]` in f32, 151 MiB).
pub const MMAP_THRESHOLD: usize = 256 << 20;

/// Up to this much free memory at the top of the heap stays with the process after a peak.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// Keeps freed blocks of up to [`MMAP_THRESHOLD`] with the allocator, and up to [`TRIM_THRESHOLD`] of free memory
/// at the top of its heap, instead of handing them back to the kernel. For a binary to call before its first large
/// allocation; it sets a process-wide option, which is why nothing in this crate calls it.
///
/// Returns whether it set them: not where the environment already sets glibc's malloc options (`GLIBC_TUNABLES`
/// with a `glibc.malloc.` tunable, or the `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` variables), which
/// are the user's to choose, and not on platforms other than Linux with glibc.
pub fn keep_freed_memory() -> bool {
    let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    let user_set = env("GLIBC_TUNABLES").is_some_and(|t| t.contains("glibc.malloc."))
        || env("MALLOC_MMAP_THRESHOLD_").is_some()
        || env("MALLOC_TRIM_THRESHOLD_").is_some();
    !user_set && set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    let as_int = |bytes: usize| libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` takes the allocator's lock and only changes its tuning; any thread may call it at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, as_int(MMAP_THRESHOLD)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(TRIM_THRESHOLD)) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far: each is a page the kernel handed over (and zeroed).
    fn page_faults() -> i64 {
        // SAFETY: `getrusage` writes the struct it is given; a zeroed `rusage` is a valid one.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    #[test]
    fn a_freed_activation_comes_back_without_fresh_pages() {
        // What `keep_freed_memory` sets where the environment does not.
        assert!(set_thresholds(), "glibc refused the thresholds");
        // A 16 MiB activation, written, freed and allocated again, as a pass does with each op's output. Without the
        // thresholds every round gets fresh pages: measured 4,098 faults in the 4 rounds.
        let round = || {
            let block = vec![1u8; 16 << 20];
            std::hint::black_box(&block);
        };
        round();
        let before = page_faults();
        for _ in 0..4 {
            round();
        }
        let faults = page_faults() - before;
        assert!(faults < 400, "{faults} page faults in 4 rounds: the block went back to the kernel each time");
    }
}

//! The `switchyard` binary.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let _ = no_transparent_huge_pages();
    switchyard::cli::main()
}

/// Keeps the allocator's memory in 4 KiB pages. mimalloc asks for
/// transparent huge pages on its arenas, and a page of 2 MiB is resident
/// whole once any byte of it is touched: a 100,000-action dispatch burst
/// allocates and frees millions of small objects across threads, and its
/// peak RSS was higher with them (460-507 MiB against 435-456 MiB, in
/// runs of the same day), with no change in lateness or push throughput
/// measured (docs/performance.md). Set before anything else runs; it
/// applies to memory already mapped too (the kernel checks it when a page
/// is first touched). Best effort: a kernel without it (before 3.15)
/// keeps its huge pages. Whether it took is returned.
fn no_transparent_huge_pages() -> bool {
    #[cfg(target_os = "linux")]
    {
        let off: libc::c_ulong = 0;
        // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and
        // touches no memory of ours; it only sets a flag on this process.
        #[allow(unsafe_code)]
        let done =
            unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, off, off, off) };
        done == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_process_keeps_no_transparent_huge_pages() {
        assert!(super::no_transparent_huge_pages());
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        // Kernels since 6.x say so; older ones have no such line.
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }
}

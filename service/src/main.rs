//! The `switchyard` binary.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    switchyard::cli::main()
}

/// Keeps the allocator's memory in 4 KiB pages. mimalloc asks for
/// transparent huge pages on its arenas, and a page of 2 MiB is resident
/// whole once any byte of it is touched: a 100,000-action dispatch burst
/// allocates and frees millions of small objects across threads, and its
/// peak RSS was 30-50 MiB higher with them (430-436 against 460-507 MiB,
/// docs/performance.md), with no gain in lateness or throughput measured.
/// Set before anything else runs; it applies to the memory already mapped
/// too (the kernel checks it when a page is first touched).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and touches
    // no memory of ours; it only sets a flag on this process.
    #[allow(unsafe_code)]
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

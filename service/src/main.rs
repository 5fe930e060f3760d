//! The `switchyard` binary.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let _ = no_transparent_huge_pages();
    if !sqlite_allocates_with_mimalloc() {
        // Before logging is set up: said once, on standard error.
        eprintln!("warning: SQLite keeps glibc's allocator (it was initialised before main)");
    }
    switchyard::cli::main()
}

/// SQLite allocates through mimalloc too, not glibc's malloc: its page
/// caches and statements are allocated and freed on the writer's thread
/// and on each reader's, and glibc keeps an arena per thread whose freed
/// memory stays resident. A 100,000-action dispatch burst peaked at
/// 264-268 MiB this way, against 313-314 MiB with SQLite on glibc, in
/// alternating runs (docs/performance.md). Set before any connection is
/// opened (SQLite takes its allocator when it first initializes); whether
/// it took is returned.
fn sqlite_allocates_with_mimalloc() -> bool {
    use rusqlite::ffi;
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(sqlite_mem::malloc),
        xFree: Some(sqlite_mem::free),
        xRealloc: Some(sqlite_mem::realloc),
        xSize: Some(sqlite_mem::size),
        xRoundup: Some(sqlite_mem::roundup),
        xInit: Some(sqlite_mem::init),
        xShutdown: Some(sqlite_mem::shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to the methods, which
    // SQLite copies before returning; it is refused (SQLITE_MISUSE) once
    // SQLite is initialized, and nothing has opened a connection yet.
    #[allow(unsafe_code)]
    let done = unsafe {
        ffi::sqlite3_config(
            ffi::SQLITE_CONFIG_MALLOC,
            &methods as *const ffi::sqlite3_mem_methods,
        )
    };
    done == ffi::SQLITE_OK
}

/// SQLite's memory methods on mimalloc.
mod sqlite_mem {
    use libmimalloc_sys::{mi_free, mi_malloc, mi_realloc};
    use std::ffi::{c_int, c_void};

    #[allow(unsafe_code)]
    unsafe extern "C" {
        // mimalloc's own function (in the library `mimalloc` links),
        // declared here rather than through libmimalloc-sys's optional
        // `extended` bindings.
        fn mi_usable_size(p: *const c_void) -> usize;
    }

    // SAFETY (the four below): SQLite passes sizes it has checked
    // (positive, below its limit; a reallocation's from `roundup`) and
    // pointers it got from these same functions.
    #[allow(unsafe_code)]
    pub(super) unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
        unsafe { mi_malloc(usize::try_from(n).unwrap_or(0)) }
    }
    #[allow(unsafe_code)]
    pub(super) unsafe extern "C" fn free(p: *mut c_void) {
        unsafe { mi_free(p) }
    }
    #[allow(unsafe_code)]
    pub(super) unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
        unsafe { mi_realloc(p, usize::try_from(n).unwrap_or(0)) }
    }
    #[allow(unsafe_code)]
    pub(super) unsafe extern "C" fn size(p: *mut c_void) -> c_int {
        c_int::try_from(unsafe { mi_usable_size(p) }).unwrap_or(c_int::MAX)
    }
    /// Sizes rounded up to 8 bytes, as SQLite's own allocator does.
    pub(super) extern "C" fn roundup(n: c_int) -> c_int {
        n.saturating_add(7) & !7
    }
    pub(super) extern "C" fn init(_: *mut c_void) -> c_int {
        rusqlite::ffi::SQLITE_OK
    }
    pub(super) extern "C" fn shutdown(_: *mut c_void) {}
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
    fn sqlites_sizes_are_rounded_up_to_eight_bytes() {
        let r = super::sqlite_mem::roundup;
        assert_eq!([r(1), r(7), r(8), r(9), r(1001)], [8, 8, 8, 16, 1008]);
    }

    #[test]
    fn sqlite_takes_its_memory_from_mimalloc() {
        use std::ffi::c_void;
        #[allow(unsafe_code)]
        unsafe extern "C" {
            fn mi_is_in_heap_region(p: *const c_void) -> bool;
        }
        // Before SQLite's first use in this process (no other test of
        // this binary uses SQLite, whether each test runs in a process of
        // its own, as under nextest, or not).
        assert!(super::sqlite_allocates_with_mimalloc());
        // SAFETY: a plain allocation, checked, then freed by SQLite.
        #[allow(unsafe_code)]
        unsafe {
            let p = rusqlite::ffi::sqlite3_malloc(1000);
            assert!(!p.is_null());
            assert!(mi_is_in_heap_region(p), "SQLite's memory is mimalloc's");
            assert!(rusqlite::ffi::sqlite3_msize(p) >= 1000);
            // Grown, it keeps its contents, still in mimalloc's heap.
            std::ptr::write_bytes(p.cast::<u8>(), 0xa5, 1000);
            let q = rusqlite::ffi::sqlite3_realloc(p, 100_000);
            assert!(!q.is_null());
            assert!(mi_is_in_heap_region(q));
            assert!(rusqlite::ffi::sqlite3_msize(q) >= 100_000);
            let kept = std::slice::from_raw_parts(q.cast::<u8>(), 1000);
            assert!(kept.iter().all(|&b| b == 0xa5));
            rusqlite::ffi::sqlite3_free(q);
        }
        // And a database works on it.
        let db = rusqlite::Connection::open_in_memory().expect("open");
        let n: i64 = db
            .query_row(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000) \
                 SELECT sum(length(printf('%0100d', i))) FROM n",
                [],
                |r| r.get(0),
            )
            .expect("query");
        assert_eq!(n, 1_000_000);
    }

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

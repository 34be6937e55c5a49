//! Counting every heap allocation of a test, C's as well as Rust's.
//!
//! dhat (the allocation tests' global allocator) sees only Rust's heap.
//! aws-lc allocates its AEAD contexts and keys with `OPENSSL_malloc`, that
//! is `malloc`, which dhat never sees: a change that built a C context per
//! frame would pass a dhat-only "no allocation per frame" test.
//!
//! [`count_heap_calls!`](crate::count_heap_calls) puts a counting `malloc`,
//! `calloc` and `realloc` into the test binary that invokes it. Defined in
//! the executable, they take the place of glibc's for every caller in it:
//! Rust's `System` allocator (under dhat) and the statically linked aws-lc
//! alike. Each counts the call on the calling thread and hands it to
//! glibc's own implementation (`__libc_malloc`, ...). glibc's in-use bytes
//! (`mallinfo2`) come with it, for checks that nothing is retained.
//!
//! Why count calls rather than compare `mallinfo2` before and after: a C
//! context built and freed per frame leaves the bytes in use unchanged; only
//! the number of calls shows it.
//!
//! Under dhat, a Rust allocation also brings calls of dhat's own
//! bookkeeping (it records the allocation's site): counts of calls match
//! counts of blocks only where Rust allocates nothing, which is what the
//! allocation tests require.
//!
//! Not counted: `posix_memalign`, `aligned_alloc` and `memalign`, which
//! glibc serves without calling `malloc` (Rust uses them only for
//! alignments above 16, aws-lc not on these paths); dhat still counts the
//! Rust ones.

/// Defines `mod heap_calls` in the invoking test binary: counting `malloc`,
/// `calloc` and `realloc` (see the [module doc](crate::heap)), and
///
/// * `heap_calls::on_this_thread() -> u64`: the allocation calls (all three
///   kinds, from Rust or C) made so far on the calling thread;
/// * `heap_calls::in_use() -> usize`: glibc's bytes in use ([`crate::heap::in_use`]).
///
/// Invoke it once, at the top level of a test binary, on Linux with glibc.
#[macro_export]
macro_rules! count_heap_calls {
    () => {
        /// Every heap allocation call of this binary, counted per thread
        /// (`capnp_noise_test::count_heap_calls!`).
        #[allow(unsafe_code)]
        mod heap_calls {
            use std::cell::Cell;
            use std::ffi::c_void;

            std::thread_local! {
                // const, no destructor: usable from malloc at any time,
                // and it never allocates itself.
                static CALLS: Cell<u64> = const { Cell::new(0) };
            }

            extern "C" {
                fn __libc_malloc(size: usize) -> *mut c_void;
                fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
                fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void;
            }

            fn count() {
                CALLS.with(|c| c.set(c.get() + 1));
            }

            // SAFETY (the three below): each has the C signature of the
            // function it replaces and passes its arguments unchanged to
            // glibc's implementation of that same function, so callers get
            // exactly glibc's contract; the count is a const thread-local
            // Cell, which neither allocates nor unwinds.
            #[no_mangle]
            unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
                count();
                unsafe { __libc_malloc(size) }
            }

            #[no_mangle]
            unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
                count();
                unsafe { __libc_calloc(n, size) }
            }

            #[no_mangle]
            unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
                count();
                unsafe { __libc_realloc(p, size) }
            }

            /// Allocation calls so far on this thread, from Rust or C.
            pub fn on_this_thread() -> u64 {
                CALLS.with(Cell::get)
            }

            /// glibc's bytes in use, every thread ([`in_use`]).
            pub fn in_use() -> usize {
                $crate::heap::in_use()
            }
        }
    };
}

/// Bytes in use in glibc's allocator (`mallinfo2`: `uordblks + hblkhd`, all
/// arenas plus mmapped blocks, chunk headers included), which serves both
/// Rust's heap and C code such as aws-lc. 0 where glibc is not the C
/// library.
#[allow(unsafe_code)]
pub fn in_use() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// glibc's `struct mallinfo2`.
        #[repr(C)]
        struct MallInfo2 {
            arena: usize,
            ordblks: usize,
            smblks: usize,
            hblks: usize,
            hblkhd: usize,
            usmblks: usize,
            fsmblks: usize,
            uordblks: usize,
            fordblks: usize,
            keepcost: usize,
        }
        extern "C" {
            fn mallinfo2() -> MallInfo2;
        }
        // SAFETY: mallinfo2 (glibc 2.33 and later) takes nothing and
        // returns a plain struct by value, whose exact layout MallInfo2 is.
        let m = unsafe { mallinfo2() };
        let _unused = (m.arena, m.ordblks, m.smblks, m.hblks, m.usmblks);
        let _unused = (m.fsmblks, m.fordblks, m.keepcost);
        m.uordblks + m.hblkhd
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0
    }
}

//! The allocator's settings for the `ecache` binary.

/// mimalloc's `purge_delay` option (its place in `mi_option_t`, the same in mimalloc 2 and
/// 3; the sys crate exports no constant for it).
pub const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc (the binary's global allocator) never to hand freed memory back to the kernel, unless the environment
/// says otherwise (`MIMALLOC_PURGE_DELAY`). By default it purges freed spans after 10 ms,
/// and a prefill frees and takes again buffers of megabytes every layer: each one came back
/// as fresh pages the kernel zeroed, about 20,000 page faults and a tenth of the llava-mid
/// prefill (docs/performance.md, "Prefill: where the rest went"). The cost is that the
/// process keeps its peak footprint (+4% peak RSS there).
pub fn keep_freed_memory() {
    // SAFETY: a plain integer option; the binary calls this first thing in `main`, before
    // any other thread exists (mimalloc's option setters are not thread-safe).
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, -1) };
}

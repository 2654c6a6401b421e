//! The binary's allocator keeps freed memory: a large buffer freed and taken again comes
//! back without the kernel faulting in fresh pages (`ecache_cli::alloc`).
//!
//! Its own test binary: it installs the binary's global allocator and sets the option
//! before anything else allocates.

#![cfg(target_os = "linux")]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    rest.split(' ')
        .nth(7)
        .expect("minflt")
        .parse()
        .expect("a number")
}

/// Faults taken while allocating and writing a buffer of `bytes`, then freeing it.
fn faults_of_one_buffer(bytes: usize) -> u64 {
    let before = minor_faults();
    let mut buffer = vec![1u8; bytes];
    // Every page written, and the buffer kept alive until here.
    for i in (0..bytes).step_by(4096) {
        buffer[i] = (i % 251) as u8;
    }
    std::hint::black_box(&buffer);
    drop(buffer);
    minor_faults() - before
}

#[test]
fn a_freed_buffer_comes_back_without_fresh_pages() {
    // A mutation: without this call (or with MIMALLOC_PURGE_DELAY=10) every round faults.
    ecache_cli::alloc::keep_freed_memory();
    let bytes = 64 << 20;
    let first = faults_of_one_buffer(bytes);
    // mimalloc's default would purge the freed span 10 ms after the free.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut again = Vec::new();
    for round in 0..5 {
        // Other work allocates in between, as other layers do: mimalloc purges expired
        // spans lazily, from inside later allocations.
        for size in [1 << 20, 3 << 20, 5 << 20] {
            std::hint::black_box(vec![round as u8; size]);
        }
        again.push(faults_of_one_buffer(bytes));
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    // The first buffer faults its pages in (4 KiB or 2 MiB each); the later ones reuse them.
    assert!(first >= 16, "the first 64 MiB took only {first} faults");
    let worst = *again.iter().max().unwrap();
    assert!(
        worst * 8 <= first,
        "freed memory came back with fresh pages: {first} faults the first time, {again:?} after"
    );
}

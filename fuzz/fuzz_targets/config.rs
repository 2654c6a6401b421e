#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ecache_fuzz::config(data));

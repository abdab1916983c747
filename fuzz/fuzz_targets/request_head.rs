//! Fuzz what reads a request head before policy: `cargo +nightly fuzz run request_head`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chaperone::fuzzing::request_head(data);
});

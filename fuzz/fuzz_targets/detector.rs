//! Fuzz the embedded-secret detector: `cargo +nightly fuzz run detector`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chaperone::strip::fuzzing::check(data);
});

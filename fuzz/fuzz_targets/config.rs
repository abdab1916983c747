//! Fuzz the config loader: `cargo +nightly fuzz run config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    chaperone::fuzzing::config(data);
});

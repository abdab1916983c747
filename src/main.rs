#![forbid(unsafe_code)]

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: allocation was the largest item in the request-path
/// profile (about 12% of CPU under load); see BENCHMARKS.md. The `system-allocator` feature
/// leaves it out, so that heap profilers that hook malloc see every allocation.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    chaperone::cli::main()
}

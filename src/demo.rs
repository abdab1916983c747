//! The demo.
/// Run the demo.
pub async fn run() -> std::process::ExitCode {
    std::process::ExitCode::SUCCESS
}

//! Files read at run time and watched for change: the secrets credentials are read from
//! (static secrets, signing keys, client certificates, token-endpoint secrets), the policy
//! files, and the webhook's serving certificate.

use std::path::Path;
use std::time::SystemTime;

use secrecy::SecretString;

/// Modification time and length of a file; `None` when it cannot be read. Two stamps differ
/// when the file was replaced or rewritten (kubelet's atomic symlink swap included).
pub(crate) type FileStamp = Option<(SystemTime, u64)>;

/// The file's current stamp.
pub(crate) fn stamp_of(path: &Path) -> FileStamp {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// A secret as written by hand or by a mounter: the trailing newline is not part of it, and
/// an empty value is an error, never an empty credential.
pub(crate) fn nonempty_secret(raw: &str, what: &str) -> Result<SecretString, String> {
    let v = raw.trim_end_matches(['\n', '\r']);
    if v.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    Ok(SecretString::from(v.to_string()))
}

/// Read a file that must be a regular one (after symlinks): a FIFO or a device would block
/// the reader until something writes to it, so it is refused before it is opened.
pub(crate) fn read_regular(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file (a FIFO or device would block reading it)".into());
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

/// Read a secret file (see [`nonempty_secret`]). Error texts name the file, never its content.
///
/// Only a regular file is read (after symlinks, as kubelet's mounts are): a FIFO or a device
/// would block the reader until something writes to it.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> Result<SecretString, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "the {what} file {} is not a regular file (a FIFO or device would block reading it)",
            path.display()
        ));
    }
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?;
    nonempty_secret(&raw, what).map_err(|e| format!("{e} ({})", path.display()))
}

/// A watcher's periodic file work (stat and read), run off the event loop and never twice at
/// once. A read that does not return (a file on a hung network mount) then holds one
/// blocking thread, not a runtime thread, and later checks are skipped, with a warning a
/// minute, until it returns: the watcher stays responsive, and stuck reads cannot pile up.
pub(crate) struct OffLoop {
    what: &'static str,
    running: Option<(tokio::task::JoinHandle<()>, std::time::Instant)>,
    warned: Option<std::time::Instant>,
}

impl OffLoop {
    /// For the watcher of `what` (named in the warning).
    pub(crate) fn new(what: &'static str) -> OffLoop {
        OffLoop {
            what,
            running: None,
            warned: None,
        }
    }

    /// Start `work` once the previous run has returned, waiting up to `wait` for it (a check
    /// asked for, such as a SIGHUP reload, is not skipped for a routine one in progress).
    pub(crate) async fn run_after(
        &mut self,
        wait: std::time::Duration,
        work: impl FnOnce() + Send + 'static,
    ) -> bool {
        if let Some((previous, _)) = self.running.as_mut() {
            let _ = tokio::time::timeout(wait, previous).await;
        }
        self.run(work)
    }

    /// Start `work` unless the previous run is still going; whether it was started.
    pub(crate) fn run(&mut self, work: impl FnOnce() + Send + 'static) -> bool {
        if let Some((previous, since)) = &self.running
            && !previous.is_finished()
        {
            if self
                .warned
                .is_none_or(|w| w.elapsed() >= std::time::Duration::from_secs(60))
            {
                tracing::warn!(
                    watcher = self.what,
                    stuck_for = ?since.elapsed(),
                    "a file check has not returned (a hung mount?); skipping checks until it does"
                );
                self.warned = Some(std::time::Instant::now());
            }
            return false;
        }
        self.warned = None;
        self.running = Some((tokio::task::spawn_blocking(work), std::time::Instant::now()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A check that blocks holds only itself: the next is skipped, not queued, and checks
    /// start again once it returns.
    #[tokio::test]
    async fn a_stuck_check_is_not_run_twice_and_does_not_hold_the_loop() {
        let mut checks = OffLoop::new("test");
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        assert!(checks.run(move || {
            let _ = stuck.recv();
        }));
        // The event loop is free: this task goes on while the check blocks.
        tokio::task::yield_now().await;
        assert!(!checks.run(|| panic!("a second check while the first is stuck")));
        release.send(()).unwrap();
        for _ in 0..200 {
            if checks.run(|| {}) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("checks did not start again once the stuck one returned");
    }
}

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

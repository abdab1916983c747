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

/// Read a secret file (see [`nonempty_secret`]). Error texts name the file, never its content.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> Result<SecretString, String> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the {what} file {}: {e}", path.display()))?;
    nonempty_secret(&raw, what).map_err(|e| format!("{e} ({})", path.display()))
}

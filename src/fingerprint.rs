//! Keyed fingerprints of secrets: HMAC-SHA256 under a per-deployment key, truncated.
//!
//! SREs can follow one leaked key across log lines (same key, same fingerprint) while the log
//! never holds anything from which the secret can be recovered or tested offline without the
//! key.

use aws_lc_rs::hmac;

/// Computes fingerprints; cheap to clone.
#[derive(Clone)]
pub struct Fingerprinter {
    key: hmac::Key,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter([key redacted])")
    }
}

impl Fingerprinter {
    /// A fingerprinter with the given key material.
    pub fn new(key: &[u8]) -> Self {
        Fingerprinter {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// A fingerprinter with a random key (fingerprints match within this process only), from
    /// the kernel's CSPRNG (getrandom(2)), so the start does not wait for aws-lc to seed.
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        getrandom::getrandom(&mut k).expect("system randomness");
        Self::new(&k)
    }

    /// Load the key from a file (at least 16 bytes), or make a random one.
    pub(crate) fn from_file_or_random(path: Option<&std::path::Path>) -> std::io::Result<Self> {
        match path {
            None => Ok(Self::random()),
            Some(p) => {
                let k = std::fs::read(p)?;
                if k.len() < 16 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: a fingerprint key needs at least 16 bytes", p.display()),
                    ));
                }
                Ok(Self::new(&k))
            }
        }
    }

    /// 12 hex characters (48 bits) of HMAC-SHA256 over the value.
    pub fn fingerprint(&self, value: &[u8]) -> String {
        let tag = hmac::sign(&self.key, value);
        hex(&tag.as_ref()[..6])
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of `bytes`, in lower-case hex (a payload hash, a cache key for a secret).
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_stable() {
        let a = Fingerprinter::new(b"key-one-key-one-");
        let b = Fingerprinter::new(b"key-two-key-two-");
        assert_eq!(a.fingerprint(b"secret"), a.fingerprint(b"secret"));
        assert_ne!(a.fingerprint(b"secret"), b.fingerprint(b"secret"));
        assert_ne!(a.fingerprint(b"secret"), a.fingerprint(b"secreT"));
        assert_eq!(a.fingerprint(b"secret").len(), 12);
    }

    #[test]
    fn random_keys_differ() {
        let (a, b) = (Fingerprinter::random(), Fingerprinter::random());
        assert_ne!(a.fingerprint(b"secret"), b.fingerprint(b"secret"));
    }
}

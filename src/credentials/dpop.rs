//! DPoP (RFC 9449): tokens bound to a key that lives only in the sidecar, and a fresh proof of
//! possession with every use.
//!
//! One key per credential (P-256, ES256, the algorithm every DPoP server accepts), generated
//! at start and replaced every `rotate_every`; its RFC 7638 thumbprint (`jkt`) is part of the
//! token cache key, so a token bound to a replaced key is never sent with the new key's proofs.
//! A proof is a JWS with header `{typ: dpop+jwt, alg, jwk}` and claims `jti` (unique), `htm`,
//! `htu` (the URL without query and fragment), `iat`, `ath` (the token's SHA-256, on resource
//! requests) and `nonce` when the server asked for one (`DPoP-Nonce`, remembered per origin).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use parking_lot::{Mutex, RwLock};

use super::keys::{KeyError, SigningKey};

/// The `error` a server answers when it wants a nonce in the proof.
pub(crate) const USE_DPOP_NONCE: &str = "use_dpop_nonce";
/// The response header carrying the nonce.
pub(crate) const DPOP_NONCE: &str = "dpop-nonce";
/// Origins whose nonce is remembered, at most (a nonce is an optimisation: forgetting one
/// costs a retry).
const MAX_NONCES: usize = 1024;

struct Current {
    key: SigningKey,
    /// `base64url(header) + "."`.
    header_b64: String,
    since: Instant,
}

/// One credential's DPoP key and the nonces its servers asked for.
pub struct DpopKey {
    current: RwLock<Arc<Current>>,
    rotate_every: Duration,
    nonces: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey")
            .field("jkt", &self.jkt())
            .finish_non_exhaustive()
    }
}

fn current(key: SigningKey) -> Current {
    let header =
        serde_json::json!({ "typ": "dpop+jwt", "alg": key.alg(), "jwk": key.public_jwk() });
    Current {
        header_b64: format!("{}.", B64.encode(header.to_string())),
        key,
        since: Instant::now(),
    }
}

impl DpopKey {
    /// A fresh key, replaced every `rotate_every`.
    pub fn new(rotate_every: Duration) -> Result<Self, KeyError> {
        Ok(DpopKey {
            current: RwLock::new(Arc::new(current(SigningKey::generate_p256()?))),
            rotate_every,
            nonces: Mutex::new(HashMap::new()),
        })
    }

    /// The key's RFC 7638 thumbprint: what a bound token's `cnf.jkt` names.
    pub(crate) fn jkt(&self) -> String {
        self.current.read().key.kid().to_string()
    }

    /// Replace the key when it is due; tokens bound to the old one are then not used again
    /// (the cache key names the thumbprint).
    pub(crate) fn maybe_rotate(&self) {
        if self.current.read().since.elapsed() < self.rotate_every {
            return;
        }
        match SigningKey::generate_p256() {
            Ok(k) => {
                tracing::info!(jkt = %k.kid(), "DPoP key rotated");
                *self.current.write() = Arc::new(current(k));
            }
            Err(e) => {
                tracing::warn!(error = %e, "DPoP key rotation failed; keeping the current key")
            }
        }
    }

    /// A proof for `htm` `htu`; `token` (the access token it accompanies) sets `ath`. The
    /// nonce the origin of `htu` last asked for goes in.
    pub fn proof(&self, htm: &str, htu: &str, token: Option<&str>) -> Result<String, KeyError> {
        let cur = self.current.read().clone();
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut claims = serde_json::json!({
            "jti": uuid::Uuid::new_v4().simple().to_string(),
            "htm": htm,
            "htu": htu,
            "iat": iat,
        });
        if let Some(t) = token {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, t.as_bytes());
            claims["ath"] = B64.encode(d.as_ref()).into();
        }
        if let Some(n) = self.nonces.lock().get(origin_of(htu)) {
            claims["nonce"] = n.clone().into();
        }
        let mut out = String::with_capacity(cur.header_b64.len() + 256);
        out.push_str(&cur.header_b64);
        B64.encode_string(claims.to_string(), &mut out);
        let sig = cur.key.sign(out.as_bytes())?;
        out.push('.');
        B64.encode_string(sig, &mut out);
        Ok(out)
    }

    /// Remember the nonce a server at `url`'s origin asked for (its `DPoP-Nonce`).
    pub(crate) fn learn_nonce(&self, url: &str, nonce: &str) {
        let mut n = self.nonces.lock();
        if n.len() >= MAX_NONCES && !n.contains_key(origin_of(url)) {
            n.clear();
        }
        n.insert(origin_of(url).to_string(), nonce.to_string());
    }
}

/// `scheme://authority` of a URL.
fn origin_of(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// The `htu` of a request: its URL without query and fragment (RFC 9449 §4.2).
pub(crate) fn htu(scheme: &str, authority: &str, path: &str) -> String {
    format!("{scheme}://{authority}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::Jwk};

    #[test]
    fn a_proof_verifies_with_its_own_key_and_binds_the_call() {
        let k = DpopKey::new(Duration::from_secs(3600)).unwrap();
        k.learn_nonce("https://as.example/token", "n-1");
        let p = k
            .proof("POST", "https://as.example/token", Some("the-token"))
            .unwrap();
        let header = jsonwebtoken::decode_header(&p).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        let jwk: Jwk =
            serde_json::from_value(serde_json::to_value(header.jwk.unwrap()).unwrap()).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &p,
            &DecodingKey::from_jwk(&jwk).unwrap(),
            &v,
        )
        .unwrap()
        .claims;
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://as.example/token");
        assert_eq!(claims["nonce"], "n-1");
        let ath = B64
            .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"the-token").as_ref());
        assert_eq!(claims["ath"], ath);
        let again = k.proof("POST", "https://other.example/x", None).unwrap();
        assert_ne!(p, again);
        let c2: serde_json::Value =
            serde_json::from_slice(&B64.decode(again.split('.').nth(1).unwrap()).unwrap()).unwrap();
        assert_eq!(c2.get("nonce"), None, "a nonce is per origin");
        assert_eq!(c2.get("ath"), None);
        assert_ne!(c2["jti"], claims["jti"]);
    }

    #[test]
    fn origins() {
        assert_eq!(
            origin_of("https://a.example:8443/x/y"),
            "https://a.example:8443"
        );
        assert_eq!(origin_of("http://a.example"), "http://a.example");
    }
}

//! Per-call JWTs (DESIGN §4), in one of two profiles, each as its standard says:
//! - `access_token` (default): an RFC 9068 JWT access token, `typ: at+jwt`, `aud` the route's
//!   audience or the destination's origin, `client_id` the workload; sent as
//!   `Authorization: Bearer`.
//! - `txn_token`: an IETF OAuth Transaction Token, `typ: txntoken+jwt`, `aud` the trust domain;
//!   sent in the `Txn-Token` header, never as `Authorization` (the draft forbids using one as
//!   an access token).
//!
//! Both carry what binds the token to the call: `txn` (the request id), `scope` with
//! `purpose:<p>`, `req_wl`, `tctx`, `rctx`.
//!
//! The key pair is parsed once and held. Signing goes straight to aws-lc-rs rather than
//! through `jsonwebtoken::encode`, which re-parses the PKCS#8 key and re-derives the public
//! key on every call. The tokens are standard compact JWS; tests and the demo verify them
//! with `jsonwebtoken` against the JWKS, so the format is checked by an independent
//! implementation.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use secrecy::SecretString;
use serde::Serialize;

use super::CredentialError;
use super::keys::{Allow, SigningKey};
use crate::files::{FileStamp, stamp_of};

/// Where a `jwt` credential's signing key comes from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Ed25519 keys generated in memory, replaced every `rotate_every` if set.
    Generated {
        /// Rotation period; `None` keeps one key for the life of the process.
        rotate_every: Option<Duration>,
    },
    /// A PEM PKCS#8 file (Ed25519 or P-256); a changed file rotates the key.
    File(PathBuf),
}

/// Which standard a minted token follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// RFC 9068 JWT access token.
    AccessToken,
    /// IETF OAuth Transaction Token; `aud` is the trust domain.
    TxnToken {
        /// `identity.trust_domain`.
        trust_domain: String,
    },
}

impl Profile {
    /// The JOSE `typ` of its tokens.
    pub fn typ(&self) -> &'static str {
        match self {
            Profile::AccessToken => "at+jwt",
            Profile::TxnToken { .. } => TXN_TOKEN_TYP,
        }
    }
}

/// `typ` of a transaction token.
pub const TXN_TOKEN_TYP: &str = "txntoken+jwt";
/// The header a transaction token travels in.
pub const TXN_TOKEN_HEADER: &str = "txn-token";

/// Settings of one `jwt` credential.
#[derive(Debug, Clone)]
pub struct JwtSpec {
    /// Credential name.
    pub name: String,
    /// Token lifetime.
    pub ttl: Duration,
    /// `iss` claim.
    pub issuer: String,
    /// Signing key source.
    pub key: KeySource,
    /// The standard its tokens follow.
    pub profile: Profile,
}

/// How long a retired public key stays in the JWKS after the last token it signed expires:
/// verifiers commonly allow this much clock skew (jsonwebtoken's default leeway is 60 s).
const VERIFIER_LEEWAY: Duration = Duration::from_secs(60);

/// At most this many retired keys are published (rotation faster than the token lifetime
/// would otherwise grow the JWKS without bound).
const MAX_RETIRED: usize = 8;

/// What a minted token is bound to.
#[derive(Debug)]
pub struct MintRequest<'a> {
    /// `sub`: the workload identity.
    pub subject: &'a str,
    /// `aud`: route audience or destination origin.
    pub audience: &'a str,
    /// The route's explicit `audience`, asked of token endpoints.
    pub requested_audience: Option<&'a str>,
    /// The route's `resource` indicator (RFC 8707), asked of token endpoints.
    pub resource: Option<&'a str>,
    /// The route's `max_ttl`: a credential living longer is flagged.
    pub max_ttl: Option<Duration>,
    /// `txn`: the request id.
    pub txn: &'a str,
    /// Route scopes; the purpose is added.
    pub scopes: &'a [String],
    /// Workload name.
    pub workload: &'a str,
    /// Stage.
    pub stage: &'a str,
    /// Environment.
    pub environment: &'a str,
    /// Purpose of this call.
    pub purpose: &'a str,
    /// Method of this call.
    pub method: &'a str,
    /// Host of this call.
    pub host: &'a str,
    /// Path of this call (hashed into the token).
    pub path: &'a str,
    /// The user the call acts for (an on-behalf-of exchange).
    pub user: Option<&'a super::Delegation>,
}

/// A minted token and what the log may say about it.
pub struct Minted {
    /// The compact JWS.
    pub(crate) token: SecretString,
    /// `jti`.
    pub(crate) jti: String,
    /// `exp` (Unix seconds).
    pub(crate) exp: u64,
    /// `scope` as a list.
    pub(crate) scopes: Vec<String>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    /// RFC 9068 §2.2: the client the token was issued to (the workload); access tokens only.
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: &'a str,
    txn: &'a str,
    scope: &'a str,
    req_wl: &'a str,
    tctx: Tctx<'a>,
    rctx: Rctx<'a>,
}

#[derive(Serialize)]
struct Tctx<'a> {
    workload: &'a str,
    stage: &'a str,
    environment: &'a str,
    purpose: &'a str,
}

#[derive(Serialize)]
struct Rctx<'a> {
    method: &'a str,
    host: &'a str,
    path_hash: String,
}

/// The key that signs now and the public keys of the ones it replaced.
struct KeyRing {
    current: SigningKey,
    /// Precomputed `base64url(header) + "."` of the current key.
    header_b64: String,
    /// When the current key started signing.
    since: Instant,
    /// Retired public keys and until when they are published.
    retired: Vec<(serde_json::Value, Instant)>,
    /// Stamp of the key file the current key came from.
    stamp: FileStamp,
}

impl KeyRing {
    fn new(key: SigningKey, typ: &str, now: Instant, stamp: FileStamp) -> Self {
        let header = serde_json::json!({ "alg": key.alg(), "typ": typ, "kid": key.kid() });
        KeyRing {
            header_b64: format!("{}.", B64.encode(header.to_string())),
            current: key,
            since: now,
            retired: Vec::new(),
            stamp,
        }
    }
}

/// Mints per-call tokens. The signing key can rotate while tokens are being minted: each
/// mint signs with the key that is current when it starts, and a replaced key's public half
/// stays in the JWKS until every token it signed has expired.
pub struct JwtMinter {
    name: String,
    ttl: Duration,
    issuer: String,
    source: KeySource,
    profile: Profile,
    ring: RwLock<Arc<KeyRing>>,
}

impl std::fmt::Debug for JwtMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtMinter")
            .field("name", &self.name)
            .field("kid", &self.kid())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn load_key(path: &std::path::Path) -> Result<SigningKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    SigningKey::from_pem(&pem, Allow::EdOrEc).map_err(|e| format!("signing_key {e}"))
}

impl JwtMinter {
    /// Load or generate the key.
    pub fn new(spec: &JwtSpec) -> Result<Self, CredentialError> {
        let bad = |m: String| CredentialError::Config(format!("credential `{}`: {m}", spec.name));
        let (key, stamp) = match &spec.key {
            KeySource::Generated { .. } => (
                SigningKey::generate_ed25519().map_err(|e| bad(e.to_string()))?,
                None,
            ),
            KeySource::File(path) => {
                let stamp = stamp_of(path);
                (load_key(path).map_err(bad)?, stamp)
            }
        };
        Ok(JwtMinter {
            name: spec.name.clone(),
            ttl: spec.ttl,
            issuer: spec.issuer.clone(),
            source: spec.key.clone(),
            ring: RwLock::new(Arc::new(KeyRing::new(
                key,
                spec.profile.typ(),
                Instant::now(),
                stamp,
            ))),
            profile: spec.profile.clone(),
        })
    }

    fn ring(&self) -> Arc<KeyRing> {
        self.ring.read().clone()
    }

    /// Public keys to publish at `now`: the current one and retired ones still needed.
    fn jwks_at(&self, now: Instant) -> Vec<serde_json::Value> {
        let ring = self.ring();
        std::iter::once(ring.current.jwk().clone())
            .chain(
                ring.retired
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(k, _)| k.clone()),
            )
            .collect()
    }

    /// The public keys for `/.well-known/jwks.json`.
    pub(crate) fn jwks(&self) -> Vec<serde_json::Value> {
        self.jwks_at(Instant::now())
    }

    /// Id of the key that signs now.
    pub(crate) fn kid(&self) -> String {
        self.ring().current.kid().to_string()
    }

    /// Make `key` the signing key; the replaced key stays published until the tokens it
    /// signed have expired (plus verifier leeway).
    fn rotate_at(&self, key: SigningKey, now: Instant, stamp: FileStamp) {
        let mut guard = self.ring.write();
        let old = guard.clone();
        let mut next = KeyRing::new(key, self.profile.typ(), now, stamp);
        next.retired = old
            .retired
            .iter()
            .filter(|(_, until)| *until > now)
            .cloned()
            .chain(std::iter::once((
                old.current.jwk().clone(),
                now + self.ttl + VERIFIER_LEEWAY,
            )))
            .collect();
        let excess = next.retired.len().saturating_sub(MAX_RETIRED);
        next.retired.drain(..excess);
        tracing::info!(credential = %self.name, kid = %next.current.kid(), retired = %old.current.kid(), "signing key rotated");
        *guard = Arc::new(next);
    }

    /// Whether the key can change: a key file, or a generated key with `rotate_every`.
    pub(crate) fn rotates(&self) -> bool {
        matches!(
            self.source,
            KeySource::File(_)
                | KeySource::Generated {
                    rotate_every: Some(_)
                }
        )
    }

    /// Rotate if the key file changed or the generated key is due. A key file that cannot
    /// be read or parsed leaves the current key in place.
    pub(crate) fn maybe_rotate(&self) {
        let ring = self.ring();
        match &self.source {
            KeySource::Generated {
                rotate_every: Some(every),
            } if ring.since.elapsed() >= *every => match SigningKey::generate_ed25519() {
                Ok(k) => self.rotate_at(k, Instant::now(), None),
                Err(e) => {
                    tracing::warn!(credential = %self.name, error = %e, "key rotation failed")
                }
            },
            KeySource::File(path) => {
                let stamp = stamp_of(path);
                if stamp.is_none() || stamp == ring.stamp {
                    return;
                }
                match load_key(path) {
                    Ok(k) if k.kid() == ring.current.kid() => {}
                    Ok(k) => self.rotate_at(k, Instant::now(), stamp),
                    Err(e) => {
                        tracing::warn!(credential = %self.name, error = %e, "signing key file changed but cannot be used; keeping the current key")
                    }
                }
            }
            KeySource::Generated { .. } => {}
        }
    }

    /// Mint a token for one call.
    pub fn mint(&self, r: &MintRequest<'_>) -> Result<Minted, CredentialError> {
        let ring = self.ring();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let exp = now + self.ttl.as_secs();
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let mut scopes: Vec<String> = r.scopes.to_vec();
        scopes.push(format!("purpose:{}", r.purpose));
        let scope = scopes.join(" ");
        let (aud, client_id) = match &self.profile {
            Profile::AccessToken => (r.audience, Some(r.subject)),
            Profile::TxnToken { trust_domain } => (trust_domain.as_str(), None),
        };
        let claims = Claims {
            iss: &self.issuer,
            sub: r.subject,
            client_id,
            aud,
            iat: now,
            exp,
            jti: &jti,
            txn: r.txn,
            scope: &scope,
            req_wl: r.workload,
            tctx: Tctx {
                workload: r.workload,
                stage: r.stage,
                environment: r.environment,
                purpose: r.purpose,
            },
            rctx: Rctx {
                method: r.method,
                host: r.host,
                path_hash: B64.encode(digest::digest(&digest::SHA256, r.path.as_bytes()).as_ref()),
            },
        };
        let payload =
            serde_json::to_vec(&claims).map_err(|e| CredentialError::Mint(e.to_string()))?;
        let mut token = String::with_capacity(ring.header_b64.len() + payload.len() * 4 / 3 + 100);
        token.push_str(&ring.header_b64);
        B64.encode_string(&payload, &mut token);
        let sig = ring
            .current
            .sign(token.as_bytes())
            .map_err(|e| CredentialError::Mint(e.to_string()))?;
        token.push('.');
        B64.encode_string(sig, &mut token);
        Ok(Minted {
            token: SecretString::from(token),
            jti,
            exp,
            scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header, jwk::Jwk};
    use secrecy::ExposeSecret;

    fn request<'a>(scopes: &'a [String]) -> MintRequest<'a> {
        MintRequest {
            subject: "spiffe://t/ns/ml/sa/inference",
            audience: "http://api.test",
            requested_audience: None,
            resource: None,
            max_ttl: None,
            txn: "req-1",
            scopes,
            workload: "inference",
            stage: "main",
            environment: "test",
            purpose: "answer-question",
            method: "POST",
            host: "api.test",
            path: "/v1/chat",
            user: None,
        }
    }

    /// Verify against the published JWKS, choosing the key by the token's `kid`.
    fn verify(jwks: &[serde_json::Value], token: &str, alg: Algorithm) -> serde_json::Value {
        verify_as(jwks, token, alg, "at+jwt", "http://api.test")
    }

    fn verify_as(
        jwks: &[serde_json::Value],
        token: &str,
        alg: Algorithm,
        typ: &str,
        aud: &str,
    ) -> serde_json::Value {
        let header = decode_header(token).unwrap();
        assert_eq!(header.typ.as_deref(), Some(typ));
        let kid = header.kid.unwrap();
        let jwk = jwks
            .iter()
            .find(|k| k["kid"] == kid.as_str())
            .expect("the token's key is published");
        let jwk: Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let mut v = Validation::new(alg);
        v.set_audience(&[aud]);
        decode::<serde_json::Value>(token, &key, &v).unwrap().claims
    }

    fn generated(ttl: u64) -> JwtMinter {
        JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(ttl),
            issuer: "spiffe://t/ns/ml/sa/inference".into(),
            key: KeySource::Generated { rotate_every: None },
            profile: Profile::AccessToken,
        })
        .unwrap()
    }

    #[test]
    fn generated_ed25519_tokens_verify_with_jsonwebtoken() {
        let m = generated(60);
        let scopes = vec!["chat.write".to_string()];
        let a = m.mint(&request(&scopes)).unwrap();
        let b = m.mint(&request(&scopes)).unwrap();
        assert_ne!(a.jti, b.jti, "every call gets its own token");
        let claims = verify(&m.jwks(), a.token.expose_secret(), Algorithm::EdDSA);
        assert_eq!(claims["sub"], "spiffe://t/ns/ml/sa/inference");
        assert_eq!(claims["txn"], "req-1");
        assert_eq!(claims["scope"], "chat.write purpose:answer-question");
        assert_eq!(claims["tctx"]["purpose"], "answer-question");
        assert_eq!(claims["rctx"]["method"], "POST");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            60
        );
        assert_eq!(claims["jti"], a.jti.as_str());
        assert_eq!(
            claims["client_id"], "spiffe://t/ns/ml/sa/inference",
            "RFC 9068 §2.2"
        );
    }

    /// A transaction token: its own `typ`, the trust domain as `aud` whatever the route's
    /// audience, and no `client_id` (it is not an access token).
    #[test]
    fn txn_token_profile() {
        let m = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(60),
            issuer: "spiffe://t/ns/ml/sa/inference".into(),
            key: KeySource::Generated { rotate_every: None },
            profile: Profile::TxnToken {
                trust_domain: "t".into(),
            },
        })
        .unwrap();
        let t = m.mint(&request(&[])).unwrap();
        let claims = verify_as(
            &m.jwks(),
            t.token.expose_secret(),
            Algorithm::EdDSA,
            "txntoken+jwt",
            "t",
        );
        assert_eq!(claims.get("client_id"), None);
        assert_eq!(claims["txn"], "req-1");
        assert_eq!(claims["req_wl"], "inference");
    }

    #[test]
    fn es256_key_from_file_and_a_changed_file_rotates_with_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.pem");
        let first = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(&path, first.serialize_pem()).unwrap();
        let m = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(30),
            issuer: "iss".into(),
            key: KeySource::File(path.clone()),
            profile: Profile::AccessToken,
        })
        .unwrap();
        let old = m.mint(&request(&[])).unwrap();
        let old_kid = m.kid();
        assert_eq!(
            verify(&m.jwks(), old.token.expose_secret(), Algorithm::ES256)["iss"],
            "iss"
        );

        // Unchanged file: no rotation. A broken file: the current key stays.
        m.maybe_rotate();
        assert_eq!(m.kid(), old_kid);
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\nnope\n").unwrap();
        m.maybe_rotate();
        assert_eq!(m.kid(), old_kid);

        let second = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(&path, second.serialize_pem()).unwrap();
        m.maybe_rotate();
        assert_ne!(m.kid(), old_kid, "the new key signs");
        let new = m.mint(&request(&[])).unwrap();
        let jwks = m.jwks();
        assert_eq!(jwks.len(), 2, "old and new keys are both published");
        verify(&jwks, new.token.expose_secret(), Algorithm::EdDSA);
        verify(&jwks, old.token.expose_secret(), Algorithm::ES256);

        // Once every token of the old key has expired (ttl + leeway), it is withdrawn.
        let later =
            Instant::now() + Duration::from_secs(30) + VERIFIER_LEEWAY + Duration::from_secs(1);
        let published = m.jwks_at(later);
        assert_eq!(published.len(), 1);
        assert_eq!(published[0]["kid"], m.kid().as_str());
    }

    #[test]
    fn generated_keys_rotate_when_due_and_retired_keys_are_bounded() {
        let m = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(60),
            issuer: "iss".into(),
            key: KeySource::Generated {
                rotate_every: Some(Duration::ZERO),
            },
            profile: Profile::AccessToken,
        })
        .unwrap();
        let mut kids = std::collections::HashSet::new();
        for _ in 0..20 {
            kids.insert(m.kid());
            m.maybe_rotate();
        }
        assert_eq!(kids.len(), 20, "a new key each time rotation is due");
        assert_eq!(m.jwks().len(), 1 + MAX_RETIRED);
    }

    #[test]
    fn bad_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, "not a key").unwrap();
        let e = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(30),
            issuer: "iss".into(),
            key: KeySource::File(path),
            profile: Profile::AccessToken,
        })
        .unwrap_err();
        assert!(e.to_string().contains("PEM PKCS#8"), "{e}");
    }
}

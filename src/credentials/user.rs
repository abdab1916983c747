//! On behalf of a user: the user's token, taken from the request for a route whose credential
//! exchanges it (`token_exchange` with `subject_from`), verified against the issuer's JWKS when
//! `subject_jwks_url` is set, before it is sent anywhere.
//!
//! The token itself is a secret: it leaves the request here, is held as a `SecretString`, and
//! is sent only to the token endpoint as `subject_token`. What the log and policy see is its
//! issuer and subject, and whether they were verified. Exchanged tokens are cached per user
//! token (by its SHA-256), never per claimed subject, so a token is never handed to a request
//! that did not present the very token it was exchanged for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::SecretString;

use super::oauth::{TokenClient, UserSubject, exchange};

/// A user the request acts for.
pub struct Delegation {
    /// The user's token, sent as the exchange's `subject_token`.
    pub(crate) token: SecretString,
    /// Its `iss`, or "" when it is not a JWT.
    pub(crate) issuer: String,
    /// Its `sub`, or "" when it is not a JWT.
    pub(crate) subject: String,
    /// Whether the signature, expiry (and issuer and audience, when configured) were checked.
    pub(crate) verified: bool,
    /// SHA-256 of the token (hex): what exchanged tokens are cached by.
    pub(crate) digest: String,
}

impl std::fmt::Debug for Delegation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegation")
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("verified", &self.verified)
            .finish_non_exhaustive()
    }
}

/// Why a request's user token was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The route needs a user and the request named none.
    Missing(String),
    /// The token did not verify.
    Invalid(String),
}

/// How long fetched keys are used before they are fetched again.
const JWKS_TTL: Duration = Duration::from_secs(300);
/// An unknown `kid` fetches the keys again at most this often (a rotation is picked up; a
/// flood of forged `kid`s does not become a flood of fetches).
const JWKS_REFETCH: Duration = Duration::from_secs(30);
/// Signature algorithms accepted on user tokens (never `none`, never HMAC: the JWKS is public).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// One credential's user tokens: where they come from, and their issuer's keys.
pub(crate) struct UserTokens {
    pub(crate) spec: UserSubject,
    client: TokenClient,
    timeout: Duration,
    keys: tokio::sync::Mutex<Option<(Instant, Arc<JwkSet>)>>,
}

impl UserTokens {
    pub(crate) fn new(spec: UserSubject, client: TokenClient, timeout: Duration) -> Self {
        UserTokens {
            spec,
            client,
            timeout,
            keys: tokio::sync::Mutex::new(None),
        }
    }

    /// Take the user's token out of `headers` (every value of the header goes, whatever
    /// happens next) and verify it.
    pub(crate) async fn take(&self, headers: &mut HeaderMap) -> Result<Delegation, Refusal> {
        let name = &self.spec.header;
        let values: Vec<_> = match headers.entry(name) {
            http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
            http::header::Entry::Vacant(_) => Vec::new(),
        };
        let [value] = values.as_slice() else {
            return Err(if values.is_empty() {
                Refusal::Missing(format!(
                    "this route acts on behalf of a user: send the user's token in the `{name}` header"
                ))
            } else {
                Refusal::Invalid(format!("more than one `{name}` header"))
            });
        };
        let raw = value
            .to_str()
            .map_err(|_| Refusal::Invalid(format!("the `{name}` header is not text")))?
            .trim();
        let raw = raw
            .strip_prefix("Bearer ")
            .or_else(|| raw.strip_prefix("bearer "))
            .unwrap_or(raw)
            .trim();
        if raw.is_empty() {
            return Err(Refusal::Missing(format!("the `{name}` header is empty")));
        }
        let token = SecretString::from(raw.to_string());
        let digest = crate::fingerprint::sha256_hex(raw.as_bytes());
        let (issuer, subject, verified) = match &self.spec.jwks_url {
            Some(_) => {
                let (iss, sub) = self.verify(raw).await?;
                (iss, sub, true)
            }
            None => {
                let (iss, sub) = unverified_claims(raw);
                (iss, sub, false)
            }
        };
        Ok(Delegation {
            token,
            issuer,
            subject,
            verified,
            digest,
        })
    }

    /// Check the signature against the issuer's keys, then `exp` (and `nbf`), and `iss` and
    /// `aud` when configured; the token's issuer and subject.
    async fn verify(&self, token: &str) -> Result<(String, String), Refusal> {
        let invalid = |why: String| Refusal::Invalid(format!("the user's token: {why}"));
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| invalid("not a signed JWT".into()))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let keys = self.keys_with(&kid).await.map_err(invalid)?;
        let jwk = if kid.is_empty() {
            // Without a `kid` the only key may be meant.
            match keys.keys.as_slice() {
                [only] => only,
                _ => return Err(invalid("no `kid`, and the issuer has several keys".into())),
            }
        } else {
            keys.find(&kid)
                .ok_or_else(|| invalid(format!("key `{kid}` is not in the issuer's JWKS")))?
        };
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("the issuer's key: {e}")))?;
        let mut v = Validation::new(header.alg);
        v.set_required_spec_claims(&["exp", "sub"]);
        v.validate_nbf = true;
        match &self.spec.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => {
                v.required_spec_claims.insert("iss".into());
            }
        }
        match &self.spec.audience {
            Some(aud) => v.set_audience(&[aud]),
            None => v.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| invalid(e.to_string()))?
            .claims;
        let s = |k: &str| claims[k].as_str().unwrap_or_default().to_string();
        Ok((s("iss"), s("sub")))
    }

    /// The issuer's keys, fetched when there are none, when they are older than
    /// [`JWKS_TTL`], or when `kid` is unknown and the last fetch is older than
    /// [`JWKS_REFETCH`].
    async fn keys_with(&self, kid: &str) -> Result<Arc<JwkSet>, String> {
        let mut held = self.keys.lock().await;
        if let Some((at, keys)) = held.as_ref() {
            let known = kid.is_empty() || keys.find(kid).is_some();
            let age = at.elapsed();
            if age < JWKS_TTL && (known || age < JWKS_REFETCH) {
                return Ok(keys.clone());
            }
        }
        let Some(url) = &self.spec.jwks_url else {
            return Err("no JWKS to verify against".into());
        };
        let req = Request::get(url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let what = format!("the user token issuer's JWKS at {url}");
        let fetched = exchange(&self.client, req, self.timeout, &what)
            .await
            .map_err(|e| e.message)
            .and_then(|(status, body)| {
                if status != StatusCode::OK {
                    return Err(format!("{what} answered {status}"));
                }
                serde_json::from_slice::<JwkSet>(&body)
                    .map_err(|e| format!("{what} is not a JWKS: {e}"))
            });
        match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *held = Some((Instant::now(), keys.clone()));
                Ok(keys)
            }
            // Keys fetched before still verify tokens while the issuer is away.
            Err(e) => match held.as_ref() {
                Some((_, keys)) if kid.is_empty() || keys.find(kid).is_some() => {
                    tracing::warn!(error = %e, "refetching the user token issuer's JWKS failed; using the keys fetched before");
                    Ok(keys.clone())
                }
                _ => Err(e),
            },
        }
    }
}

/// `iss` and `sub` read from a JWT without checking it (for the log and policy only, marked
/// unverified); empty for an opaque token.
fn unverified_claims(token: &str) -> (String, String) {
    let payload = token.split('.').nth(1).and_then(|p| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p.trim_end_matches('='))
            .ok()
    });
    let claims: serde_json::Value = payload
        .and_then(|p| serde_json::from_slice(&p).ok())
        .unwrap_or_default();
    let s = |k: &str| claims[k].as_str().unwrap_or_default().to_string();
    (s("iss"), s("sub"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unverified_claims_of_a_jwt_and_of_an_opaque_token() {
        let b = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = format!(
            "{}.{}.sig",
            b(r#"{"alg":"RS256"}"#),
            b(r#"{"iss":"https://idp","sub":"alice"}"#)
        );
        assert_eq!(
            unverified_claims(&jwt),
            ("https://idp".to_string(), "alice".to_string())
        );
        assert_eq!(
            unverified_claims("opaque-token"),
            (String::new(), String::new())
        );
    }
}

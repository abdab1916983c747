//! Per-call JWTs shaped like IETF OAuth Transaction Tokens (DESIGN §4).
//!
//! The key pair is parsed once and held. Signing goes straight to aws-lc-rs rather than
//! through `jsonwebtoken::encode`, which re-parses the PKCS#8 key and re-derives the public
//! key on every call. The tokens are standard compact JWS; tests and the demo verify them
//! with `jsonwebtoken` against the JWKS, so the format is checked by an independent
//! implementation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::CredentialError;

/// Settings of one `jwt` credential.
#[derive(Debug, Clone)]
pub struct JwtSpec {
    /// Credential name.
    pub name: String,
    /// Token lifetime.
    pub ttl: Duration,
    /// `iss` claim.
    pub issuer: String,
    /// PEM PKCS#8 private key; `None` generates an Ed25519 key.
    pub key_pem: Option<SecretString>,
}

enum Signer {
    Ed25519(Ed25519KeyPair),
    Es256(EcdsaKeyPair),
}

/// What a minted token is bound to.
#[derive(Debug)]
pub struct MintRequest<'a> {
    /// `sub`: the workload identity.
    pub subject: &'a str,
    /// `aud`: route audience or destination origin.
    pub audience: &'a str,
    /// The route's explicit audience, sent as `resource` (RFC 8707) to token endpoints.
    pub resource: Option<&'a str>,
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
}

/// A minted token and what the log may say about it.
pub struct Minted {
    /// The compact JWS.
    pub token: SecretString,
    /// `jti`.
    pub jti: String,
    /// `exp` (Unix seconds).
    pub exp: u64,
    /// `scope` as a list.
    pub scopes: Vec<String>,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
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

/// Mints per-call tokens with one held key.
pub struct JwtMinter {
    name: String,
    signer: Signer,
    kid: String,
    jwk: serde_json::Value,
    ttl: Duration,
    issuer: String,
    /// Precomputed `base64url(header) + "."`.
    header_b64: String,
}

impl std::fmt::Debug for JwtMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtMinter")
            .field("name", &self.name)
            .field("kid", &self.kid)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl JwtMinter {
    /// Load or generate the key.
    pub fn new(spec: &JwtSpec) -> Result<Self, CredentialError> {
        let bad = |m: String| CredentialError::Config(format!("credential `{}`: {m}", spec.name));
        let signer = match &spec.key_pem {
            None => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| bad("cannot generate an Ed25519 key".into()))?;
                Signer::Ed25519(
                    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                        .map_err(|_| bad("generated key rejected".into()))?,
                )
            }
            Some(pem) => {
                let der = PrivatePkcs8KeyDer::from_pem_slice(pem.expose_secret().as_bytes())
                    .map_err(|_| {
                        bad(
                            "signing_key is not a PEM PKCS#8 private key (BEGIN PRIVATE KEY)"
                                .into(),
                        )
                    })?;
                let der = der.secret_pkcs8_der();
                if let Ok(k) = Ed25519KeyPair::from_pkcs8(der) {
                    Signer::Ed25519(k)
                } else if let Ok(k) =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                {
                    Signer::Es256(k)
                } else {
                    return Err(bad("signing_key must be an Ed25519 or P-256 key".into()));
                }
            }
        };
        let (alg, jwk_members) = match &signer {
            Signer::Ed25519(k) => (
                "EdDSA",
                vec![
                    ("crv", "Ed25519".to_string()),
                    ("kty", "OKP".into()),
                    ("x", B64.encode(k.public_key().as_ref())),
                ],
            ),
            Signer::Es256(k) => {
                let p = k.public_key().as_ref();
                // Uncompressed point: 0x04 || x || y.
                (
                    "ES256",
                    vec![
                        ("crv", "P-256".to_string()),
                        ("kty", "EC".into()),
                        ("x", B64.encode(&p[1..33])),
                        ("y", B64.encode(&p[33..65])),
                    ],
                )
            }
        };
        // RFC 7638 thumbprint: the required members in lexicographic order, no spaces.
        let canonical = format!(
            "{{{}}}",
            jwk_members
                .iter()
                .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let kid = B64.encode(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref());
        let mut jwk = serde_json::Map::new();
        for (k, v) in jwk_members {
            jwk.insert(k.into(), v.into());
        }
        jwk.insert("kid".into(), kid.clone().into());
        jwk.insert("alg".into(), alg.into());
        jwk.insert("use".into(), "sig".into());
        let header = serde_json::to_vec(&Header {
            alg,
            typ: "txntoken+jwt",
            kid: &kid,
        })
        .expect("header serializes");
        let header_b64 = format!("{}.", B64.encode(header));
        Ok(JwtMinter {
            name: spec.name.clone(),
            signer,
            kid,
            jwk: serde_json::Value::Object(jwk),
            ttl: spec.ttl,
            issuer: spec.issuer.clone(),
            header_b64,
        })
    }

    /// The public key as a JWK, for `/.well-known/jwks.json`.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// Key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Mint a token for one call.
    pub fn mint(&self, r: &MintRequest<'_>) -> Result<Minted, CredentialError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let exp = now + self.ttl.as_secs();
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let mut scopes: Vec<String> = r.scopes.to_vec();
        scopes.push(format!("purpose:{}", r.purpose));
        let scope = scopes.join(" ");
        let claims = Claims {
            iss: &self.issuer,
            sub: r.subject,
            aud: r.audience,
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
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 100);
        token.push_str(&self.header_b64);
        B64.encode_string(&payload, &mut token);
        let sig = match &self.signer {
            Signer::Ed25519(k) => k.sign(token.as_bytes()).as_ref().to_vec(),
            Signer::Es256(k) => k
                .sign(&SystemRandom::new(), token.as_bytes())
                .map_err(|_| CredentialError::Mint("ECDSA signing failed".into()))?
                .as_ref()
                .to_vec(),
        };
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

    fn request<'a>(scopes: &'a [String]) -> MintRequest<'a> {
        MintRequest {
            subject: "spiffe://t/ns/ml/sa/inference",
            audience: "http://api.test",
            resource: None,
            txn: "req-1",
            scopes,
            workload: "inference",
            stage: "main",
            environment: "test",
            purpose: "answer-question",
            method: "POST",
            host: "api.test",
            path: "/v1/chat",
        }
    }

    fn verify(m: &JwtMinter, token: &str, alg: Algorithm) -> serde_json::Value {
        let header = decode_header(token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("txntoken+jwt"));
        assert_eq!(header.kid.as_deref(), Some(m.kid()));
        let jwk: Jwk = serde_json::from_value(m.jwk().clone()).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let mut v = Validation::new(alg);
        v.set_audience(&["http://api.test"]);
        decode::<serde_json::Value>(token, &key, &v).unwrap().claims
    }

    #[test]
    fn generated_ed25519_tokens_verify_with_jsonwebtoken() {
        let m = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(60),
            issuer: "spiffe://t/ns/ml/sa/inference".into(),
            key_pem: None,
        })
        .unwrap();
        let scopes = vec!["chat.write".to_string()];
        let a = m.mint(&request(&scopes)).unwrap();
        let b = m.mint(&request(&scopes)).unwrap();
        assert_ne!(a.jti, b.jti, "every call gets its own token");
        let claims = verify(&m, a.token.expose_secret(), Algorithm::EdDSA);
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
    }

    #[test]
    fn es256_key_from_pem() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let m = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(30),
            issuer: "iss".into(),
            key_pem: Some(SecretString::from(kp.serialize_pem())),
        })
        .unwrap();
        let t = m.mint(&request(&[])).unwrap();
        let claims = verify(&m, t.token.expose_secret(), Algorithm::ES256);
        assert_eq!(claims["iss"], "iss");
    }

    #[test]
    fn bad_key_is_a_clear_error() {
        let e = JwtMinter::new(&JwtSpec {
            name: "t".into(),
            ttl: Duration::from_secs(30),
            issuer: "iss".into(),
            key_pem: Some(SecretString::from("not a key".to_string())),
        })
        .unwrap_err();
        assert!(e.to_string().contains("PEM PKCS#8"), "{e}");
    }
}

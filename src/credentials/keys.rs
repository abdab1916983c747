//! Asymmetric signing keys for JWS: the per-call tokens of `jwt` credentials and the client
//! assertions of `private_key_jwt` (RFC 7523). A key is parsed once and held; its public half
//! is published as a JWK whose `kid` is the RFC 7638 thumbprint.

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;

/// Which key types a use accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// Ed25519 and P-256 (per-call tokens: DESIGN §4).
    EdOrEc,
    /// Also RSA (client assertions: many authorization servers accept only RS256).
    AnyIncludingRsa,
}

enum Inner {
    Ed25519(Ed25519KeyPair),
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// A private key that signs JWS, with its public JWK.
pub struct SigningKey {
    inner: Inner,
    alg: &'static str,
    kid: String,
    jwk: serde_json::Value,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// What can go wrong with a signing key. The texts never contain key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The system could not make a key.
    #[error("cannot generate an Ed25519 key")]
    Generate,
    /// The PEM is not a PKCS#8 private key.
    #[error("not a PEM PKCS#8 private key (BEGIN PRIVATE KEY)")]
    NotPkcs8,
    /// A key of a kind this use does not take.
    #[error("must be {0}")]
    Kind(&'static str),
    /// Signing failed (the algorithm named).
    #[error("{0} signing failed")]
    Sign(&'static str),
}

impl SigningKey {
    /// A fresh Ed25519 key. Its private key is a 32-byte random seed (RFC 8032 §5.1.5), taken
    /// from the kernel's CSPRNG (getrandom(2)): aws-lc's own generator first seeds itself from
    /// CPU jitter, tens of milliseconds that a start with a `jwt` credential need not wait for.
    pub(crate) fn generate_ed25519() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|_| KeyError::Generate)?;
        let k = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| KeyError::Generate);
        seed.fill(0);
        Ok(Self::build(Inner::Ed25519(k?)))
    }

    /// A fresh P-256 key (ES256).
    pub(crate) fn generate_p256() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?;
        let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| KeyError::Generate)?;
        Ok(Self::build(Inner::Es256(k)))
    }

    /// The public key's required members only (RFC 7638), as a DPoP proof's `jwk` carries it.
    pub(crate) fn public_jwk(&self) -> serde_json::Value {
        let mut jwk = self.jwk.clone();
        if let Some(m) = jwk.as_object_mut() {
            for k in ["kid", "alg", "use"] {
                m.remove(k);
            }
        }
        jwk
    }

    /// Parse a PEM PKCS#8 private key.
    pub fn from_pem(pem: &[u8], allow: Allow) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPkcs8)?;
        let der = der.secret_pkcs8_der();
        let inner = if let Ok(k) = Ed25519KeyPair::from_pkcs8(der) {
            Inner::Ed25519(k)
        } else if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der) {
            Inner::Es256(k)
        } else if allow == Allow::AnyIncludingRsa
            && let Ok(k) = RsaKeyPair::from_pkcs8(der)
        {
            Inner::Rs256(k)
        } else if allow == Allow::AnyIncludingRsa {
            return Err(KeyError::Kind(
                "an Ed25519, P-256 or RSA (2048 bits or more) key",
            ));
        } else {
            return Err(KeyError::Kind("an Ed25519 or P-256 key"));
        };
        Ok(Self::build(inner))
    }

    fn build(inner: Inner) -> Self {
        // The JWK's required members, in lexicographic order (RFC 7638 §3.2).
        let (alg, members): (&'static str, Vec<(&str, String)>) = match &inner {
            Inner::Ed25519(k) => (
                "EdDSA",
                vec![
                    ("crv", "Ed25519".into()),
                    ("kty", "OKP".into()),
                    ("x", B64.encode(k.public_key().as_ref())),
                ],
            ),
            Inner::Es256(k) => {
                // Uncompressed point: 0x04 || x || y.
                let p = k.public_key().as_ref();
                (
                    "ES256",
                    vec![
                        ("crv", "P-256".into()),
                        ("kty", "EC".into()),
                        ("x", B64.encode(&p[1..33])),
                        ("y", B64.encode(&p[33..65])),
                    ],
                )
            }
            Inner::Rs256(k) => {
                let pk = k.public_key();
                (
                    "RS256",
                    vec![
                        (
                            "e",
                            B64.encode(pk.exponent().big_endian_without_leading_zero()),
                        ),
                        ("kty", "RSA".into()),
                        (
                            "n",
                            B64.encode(pk.modulus().big_endian_without_leading_zero()),
                        ),
                    ],
                )
            }
        };
        let canonical = format!(
            "{{{}}}",
            members
                .iter()
                .map(|(k, v)| format!("\"{k}\":\"{v}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        let kid = B64.encode(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref());
        let mut jwk = serde_json::Map::new();
        for (k, v) in members {
            jwk.insert(k.into(), v.into());
        }
        jwk.insert("kid".into(), kid.clone().into());
        jwk.insert("alg".into(), alg.into());
        jwk.insert("use".into(), "sig".into());
        SigningKey {
            inner,
            alg,
            kid,
            jwk: serde_json::Value::Object(jwk),
        }
    }

    /// JWS `alg`.
    pub(crate) fn alg(&self) -> &'static str {
        self.alg
    }

    /// Key id (RFC 7638 thumbprint).
    pub(crate) fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// Sign the JWS signing input (`header.payload`).
    pub(crate) fn sign(&self, input: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.inner {
            Inner::Ed25519(k) => Ok(k.sign(input).as_ref().to_vec()),
            Inner::Es256(k) => k
                .sign(&SystemRandom::new(), input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Sign("ECDSA")),
            Inner::Rs256(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), input, &mut sig)
                    .map_err(|_| KeyError::Sign("RSA"))?;
                Ok(sig)
            }
        }
    }

    /// A compact JWS of `claims` with header `{alg, typ, kid}`.
    pub(crate) fn compact(
        &self,
        typ: &str,
        claims: &serde_json::Value,
    ) -> Result<String, KeyError> {
        let header = serde_json::json!({ "alg": self.alg, "typ": typ, "kid": self.kid });
        let mut out = B64.encode(header.to_string());
        out.push('.');
        B64.encode_string(claims.to_string(), &mut out);
        let sig = self.sign(out.as_bytes())?;
        out.push('.');
        B64.encode_string(sig, &mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, jwk::Jwk};

    fn verify(k: &SigningKey, alg: Algorithm) {
        let token = k
            .compact(
                "JWT",
                &serde_json::json!({ "sub": "x", "exp": 4_000_000_000u64 }),
            )
            .unwrap();
        let jwk: Jwk = serde_json::from_value(k.jwk().clone()).unwrap();
        let mut v = Validation::new(alg);
        v.validate_aud = false;
        let claims = decode::<serde_json::Value>(&token, &DecodingKey::from_jwk(&jwk).unwrap(), &v)
            .unwrap()
            .claims;
        assert_eq!(claims["sub"], "x");
    }

    #[test]
    fn every_key_type_verifies_with_jsonwebtoken() {
        verify(&SigningKey::generate_ed25519().unwrap(), Algorithm::EdDSA);
        for (alg, jalg) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256),
            (&rcgen::PKCS_RSA_SHA256, Algorithm::RS256),
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let k = SigningKey::from_pem(kp.serialize_pem().as_bytes(), Allow::AnyIncludingRsa)
                .unwrap();
            verify(&k, jalg);
        }
    }

    #[test]
    fn each_generated_ed25519_key_is_new() {
        // The seed comes from the kernel: two keys never share a public key.
        let a = SigningKey::generate_ed25519().unwrap();
        let b = SigningKey::generate_ed25519().unwrap();
        assert_ne!(a.public_jwk()["x"], b.public_jwk()["x"]);
        assert_eq!(a.public_jwk()["x"].as_str().unwrap().len(), 43);
    }

    #[test]
    fn rsa_is_refused_where_only_ed_or_ec_is_allowed() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let e = SigningKey::from_pem(kp.serialize_pem().as_bytes(), Allow::EdOrEc).unwrap_err();
        assert!(e.to_string().contains("Ed25519 or P-256"), "{e}");
    }
}

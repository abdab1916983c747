//! Stage 6, credential: obtain the short-lived credential for this call and say how it is
//! injected. Failure is closed: the pipeline forwards nothing without its credential.

mod jwt;
mod oauth;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

pub use jwt::{JwtMinter, JwtSpec, MintRequest, Minted};
pub use oauth::{ClientAuth, OAuthSpec, skew};

use crate::fingerprint::Fingerprinter;

/// Where a static secret comes from.
#[derive(Debug, Clone)]
pub enum StaticSource {
    /// An environment variable, read at start.
    Env(String),
    /// A file, re-read when it changes.
    File(PathBuf),
}

/// A validated credential source.
#[derive(Debug, Clone)]
pub enum CredentialSpec {
    /// Per-call minted JWT.
    Jwt(JwtSpec),
    /// OAuth 2.0 client credentials.
    ClientCredentials(OAuthSpec),
    /// Secret held only by the sidecar.
    Static {
        /// Credential name.
        name: String,
        /// Where the value comes from.
        source: StaticSource,
    },
}

/// Errors obtaining a credential.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The credential is misconfigured.
    #[error("{0}")]
    Config(String),
    /// Minting failed.
    #[error("minting failed: {0}")]
    Mint(String),
    /// The route names a credential that does not exist.
    #[error("no credential named `{0}`")]
    Unknown(String),
    /// The secret is not available right now.
    #[error("{0}")]
    Unavailable(String),
}

/// A credential obtained for one call. The value is redacted in Debug output.
pub struct Issued {
    /// Credential name.
    pub name: String,
    /// `jwt` or `static`.
    pub kind: &'static str,
    /// The secret to inject.
    pub value: SecretString,
    /// Loggable id: the token's `jti`, or a fingerprint.
    pub id: String,
    /// Expiry (Unix seconds), when known.
    pub expires_at: Option<u64>,
    /// Scopes the credential carries.
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("value", &"[redacted]")
            .finish()
    }
}

/// A static secret and its loggable fingerprint.
struct StaticValue {
    value: SecretString,
    fingerprint: String,
    stamp: Option<(SystemTime, u64)>,
}

struct StaticCred {
    source: StaticSource,
    current: RwLock<Arc<StaticValue>>,
}

enum Provider {
    Jwt(JwtMinter),
    Static(StaticCred),
    OAuth {
        spec: OAuthSpec,
        cache: moka::future::Cache<String, Arc<oauth::Token>>,
    },
}

/// Each cached token expires at its own `cache_until` (before `exp`, with skew).
struct TokenExpiry;

impl moka::Expiry<String, Arc<oauth::Token>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _: &String,
        token: &Arc<oauth::Token>,
        created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(token.cache_until.saturating_duration_since(created_at))
    }
}

/// All credential sources, by name.
pub struct Credentials {
    providers: BTreeMap<String, Provider>,
    fingerprinter: Fingerprinter,
    token_client: oauth::TokenClient,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.providers.keys()).finish()
    }
}

fn read_static(source: &StaticSource, fp: &Fingerprinter) -> Result<StaticValue, CredentialError> {
    let (raw, stamp) = match source {
        StaticSource::Env(var) => (
            std::env::var(var).map_err(|_| {
                CredentialError::Unavailable(format!("environment variable {var} is not set"))
            })?,
            None,
        ),
        StaticSource::File(path) => {
            let meta = std::fs::metadata(path).map_err(|e| {
                CredentialError::Unavailable(format!("cannot read {}: {e}", path.display()))
            })?;
            let raw = std::fs::read_to_string(path).map_err(|e| {
                CredentialError::Unavailable(format!("cannot read {}: {e}", path.display()))
            })?;
            (
                raw,
                Some((
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                )),
            )
        }
    };
    let value = raw.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(CredentialError::Unavailable(
            "the static secret is empty".into(),
        ));
    }
    Ok(StaticValue {
        fingerprint: fp.fingerprint(value.as_bytes()),
        value: SecretString::from(value),
        stamp,
    })
}

impl Credentials {
    /// Build every source; fails if a key or secret cannot be loaded.
    pub fn new(
        specs: &BTreeMap<String, CredentialSpec>,
        fingerprinter: Fingerprinter,
        tls: Arc<rustls::ClientConfig>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, CredentialError> {
        let mut providers = BTreeMap::new();
        for (name, spec) in specs {
            let p = match spec {
                CredentialSpec::Jwt(j) => Provider::Jwt(JwtMinter::new(j)?),
                CredentialSpec::ClientCredentials(o) => Provider::OAuth {
                    spec: o.clone(),
                    cache: moka::future::Cache::builder()
                        .max_capacity(10_000)
                        .expire_after(TokenExpiry)
                        .build(),
                },
                CredentialSpec::Static { source, .. } => {
                    let v = read_static(source, &fingerprinter).map_err(|e| {
                        CredentialError::Config(format!("credential `{name}`: {e}"))
                    })?;
                    Provider::Static(StaticCred {
                        source: source.clone(),
                        current: RwLock::new(Arc::new(v)),
                    })
                }
            };
            providers.insert(name.clone(), p);
        }
        Ok(Credentials {
            providers,
            fingerprinter,
            token_client: oauth::token_client(tls),
            metrics,
        })
    }

    /// The JWKS document: public keys of every `jwt` credential.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .providers
            .values()
            .filter_map(|p| match p {
                Provider::Jwt(m) => Some(m.jwk().clone()),
                Provider::Static(_) | Provider::OAuth { .. } => None,
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Obtain the named credential for one call.
    pub async fn obtain(
        &self,
        name: &str,
        call: &MintRequest<'_>,
    ) -> Result<Issued, CredentialError> {
        match self.providers.get(name) {
            Some(Provider::OAuth { spec, cache }) => {
                // Keyed by everything the token is scoped to, so one route's token is never
                // handed to a request it was not issued for.
                let key = format!(
                    "{}\0{}\0{}",
                    call.resource.unwrap_or(""),
                    call.scopes.join(" "),
                    name
                );
                let labels = |result| crate::metrics::CacheLabels {
                    credential: name.to_string(),
                    result,
                };
                let token = match cache.get(&key).await {
                    Some(t) => {
                        self.metrics.token_cache.get_or_create(&labels("hit")).inc();
                        t
                    }
                    None => {
                        self.metrics
                            .token_cache
                            .get_or_create(&labels("miss"))
                            .inc();
                        // Concurrent misses for one key share a single fetch.
                        cache
                            .try_get_with(key, async {
                                oauth::fetch(&self.token_client, spec, call.resource, call.scopes)
                                    .await
                                    .map(Arc::new)
                            })
                            .await
                            .map_err(|e: Arc<CredentialError>| {
                                CredentialError::Unavailable(e.to_string())
                            })?
                    }
                };
                Ok(Issued {
                    name: name.to_string(),
                    kind: "client_credentials",
                    value: token.value.clone(),
                    id: token.jti.clone().unwrap_or_else(|| {
                        format!(
                            "fp:{}",
                            self.fingerprinter
                                .fingerprint(token.value.expose_secret().as_bytes())
                        )
                    }),
                    expires_at: Some(token.expires_at),
                    scopes: token.scopes.clone(),
                })
            }
            None => Err(CredentialError::Unknown(name.to_string())),
            Some(Provider::Jwt(m)) => {
                let t = m.mint(call)?;
                Ok(Issued {
                    name: name.to_string(),
                    kind: "jwt",
                    value: t.token,
                    id: t.jti,
                    expires_at: Some(t.exp),
                    scopes: t.scopes,
                })
            }
            Some(Provider::Static(s)) => {
                let v = s.current.read().expect("static credential lock").clone();
                Ok(Issued {
                    name: name.to_string(),
                    kind: "static",
                    value: SecretString::from(v.value.expose_secret().to_string()),
                    id: format!("fp:{}", v.fingerprint),
                    expires_at: None,
                    scopes: call.scopes.to_vec(),
                })
            }
        }
    }

    /// Re-read file-backed static secrets that changed. Keeps the last good value on error.
    pub fn refresh_files(&self) {
        for (name, p) in &self.providers {
            let Provider::Static(s) = p else { continue };
            let StaticSource::File(path) = &s.source else {
                continue;
            };
            let stamp = std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
            let current = s.current.read().expect("static credential lock").stamp;
            if stamp.is_none() || stamp == current {
                continue;
            }
            match read_static(&s.source, &self.fingerprinter) {
                Ok(v) => {
                    tracing::info!(credential = %name, fingerprint = %v.fingerprint, "static secret reloaded");
                    *s.current.write().expect("static credential lock") = Arc::new(v);
                }
                Err(e) => {
                    tracing::warn!(credential = %name, error = %e, "static secret reload failed; keeping the previous value")
                }
            }
        }
    }

    /// Poll file-backed secrets for changes every `every`.
    pub fn spawn_file_watch(self: &Arc<Self>, every: Duration) {
        let has_files = self.providers.values().any(|p| {
            matches!(
                p,
                Provider::Static(StaticCred {
                    source: StaticSource::File(_),
                    ..
                })
            )
        });
        if !has_files {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(c) = me.upgrade() else { break };
                tokio::task::block_in_place(|| c.refresh_files());
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(specs: &BTreeMap<String, CredentialSpec>) -> Credentials {
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Credentials::new(
            specs,
            Fingerprinter::random(),
            Arc::new(tls),
            Arc::new(crate::metrics::Metrics::new()),
        )
        .unwrap()
    }

    fn call() -> MintRequest<'static> {
        MintRequest {
            subject: "s",
            audience: "a",
            resource: None,
            txn: "t",
            scopes: &[],
            workload: "w",
            stage: "main",
            environment: "e",
            purpose: "p",
            method: "GET",
            host: "h",
            path: "/",
        }
    }

    #[tokio::test]
    async fn static_file_is_reread_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first-secret-value\n").unwrap();
        let specs = BTreeMap::from([(
            "k".to_string(),
            CredentialSpec::Static {
                name: "k".into(),
                source: StaticSource::File(path.clone()),
            },
        )]);
        let c = credentials(&specs);
        let a = c.obtain("k", &call()).await.unwrap();
        assert_eq!(a.value.expose_secret(), "first-secret-value");
        assert!(!format!("{a:?}").contains("first-secret-value"));
        std::fs::write(&path, "second-secret-value-longer\n").unwrap();
        c.refresh_files();
        let b = c.obtain("k", &call()).await.unwrap();
        assert_eq!(b.value.expose_secret(), "second-secret-value-longer");
        assert_ne!(a.id, b.id);
        std::fs::remove_file(&path).unwrap();
        c.refresh_files();
        assert_eq!(
            c.obtain("k", &call()).await.unwrap().value.expose_secret(),
            "second-secret-value-longer"
        );
    }

    #[tokio::test]
    async fn unknown_credential_fails_closed() {
        let c = credentials(&BTreeMap::new());
        assert!(matches!(
            c.obtain("nope", &call()).await,
            Err(CredentialError::Unknown(_))
        ));
    }
}

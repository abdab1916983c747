//! Stage 6, credential: obtain the short-lived credential for this call and say how it is
//! injected. Failure is closed: the pipeline forwards nothing without its credential.

pub mod aws;
mod cache;
pub mod dpop;
mod inject;
mod jwt;
mod keys;
mod oauth;
pub mod stores;
pub mod user;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

pub use aws::AwsSpec;
pub(crate) use inject::Call;
pub use jwt::{
    JwtMinter, JwtSpec, KeySource, MintRequest, Minted, Profile, TXN_TOKEN_HEADER, TXN_TOKEN_TYP,
};
pub use keys::{Allow, KeyError, SigningKey};
pub use oauth::{
    Assertion, ClientAuth, Exchange, Grant, IAM_CREDENTIALS, Impersonate, OAuthSpec, Subject,
    TOKEN_TYPE_JWT, TokenParams, UserSubject, skew,
};
pub use user::Delegation;

use crate::egress::Egress;
use crate::files::{self, FileStamp, stamp_of};
use crate::fingerprint::Fingerprinter;
use crate::metrics::{CacheLabels, FetchLabels, FlagLabels, Metrics};

/// Where a static secret comes from.
#[derive(Debug, Clone)]
pub enum StaticSource {
    /// An environment variable, read at start.
    Env(String),
    /// A file, re-read when it changes.
    File(PathBuf),
    /// A secret store (Secrets Manager, SSM Parameter Store), read every `refresh`.
    Store(stores::StoreSpec),
}

/// A validated credential source.
#[derive(Debug, Clone)]
pub enum CredentialSpec {
    /// Per-call minted JWT.
    Jwt(JwtSpec),
    /// A token from an authorization server: client credentials or token exchange.
    OAuth(Box<OAuthSpec>),
    /// AWS session credentials; requests are signed with SigV4.
    Aws(AwsSpec),
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
    pub(crate) name: String,
    /// `jwt`, `client_credentials`, `token_exchange` or `static`.
    pub(crate) kind: &'static str,
    /// The secret to inject.
    pub(crate) value: SecretString,
    /// Loggable id: the token's `jti`, or a fingerprint.
    pub(crate) id: String,
    /// Expiry (Unix seconds), when known.
    pub(crate) expires_at: Option<u64>,
    /// Scopes the credential carries.
    pub(crate) scopes: Vec<String>,
    /// Why this credential is not as narrow or short-lived as the route asks (see
    /// [`flag`]); empty when it is.
    pub(crate) flags: Vec<&'static str>,
    /// A per-call token to revoke once its response has ended.
    pub(crate) revoke: Option<Revocation>,
}

/// A token to revoke (RFC 7009) when its request is over: off the response path, retried
/// three times (1 s, 2 s apart), counted in `chaperone_token_revocations_total`.
pub(crate) struct Revocation {
    endpoint: Arc<oauth::TokenEndpoint>,
    url: http::Uri,
    token: SecretString,
    credential: String,
    metrics: Arc<Metrics>,
}

impl Revocation {
    /// Revoke in the background (on the current runtime; without one, count it as failed).
    pub(crate) fn spawn(self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.count("local");
            return;
        };
        rt.spawn(async move {
            let mut wait = Duration::from_secs(1);
            for attempt in 1..=3 {
                match self.endpoint.revoke(&self.url, &self.token).await {
                    Ok(()) => {
                        self.count("ok");
                        return;
                    }
                    Err(e) if attempt < 3 && e.kind != oauth::FailureKind::Rejected => {
                        tracing::debug!(credential = %self.credential, error = %e, "revocation failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait *= 2;
                    }
                    Err(e) => {
                        tracing::warn!(credential = %self.credential, error = %e, "revocation failed; the token lives until it expires");
                        self.count(e.kind.as_str());
                        return;
                    }
                }
            }
        });
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .token_revocations
            .get_or_create(&FetchLabels {
                credential: self.credential.clone(),
                result,
            })
            .inc();
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("value", &"[redacted]")
            .field("flags", &self.flags)
            .finish()
    }
}

/// Checks on an issued credential; each names a way an "ephemeral" credential falls short.
pub(crate) mod flag {
    /// The authorization server granted scopes that were not requested.
    pub(crate) const UNREQUESTED_SCOPE: &str = "unrequested_scope";
    /// The token lives longer than the route's `max_ttl`.
    pub(crate) const TTL_EXCEEDS_MAX: &str = "ttl_exceeds_max";
    /// The route has a `max_ttl` but the token's lifetime is not known.
    pub(crate) const LIFETIME_UNKNOWN: &str = "lifetime_unknown";
    /// The route has a `max_ttl` but the credential is a static secret that never expires.
    pub(crate) const NO_EXPIRY: &str = "no_expiry";
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

/// A token file (subject token) whose changes start a new generation of cached tokens: a
/// token exchanged for the previous subject token is not handed out after a rotation.
struct WatchedFile {
    path: PathBuf,
    stamp: Mutex<FileStamp>,
    generation: AtomicU64,
}

impl WatchedFile {
    fn new(path: PathBuf) -> Self {
        WatchedFile {
            stamp: Mutex::new(stamp_of(&path)),
            path,
            generation: AtomicU64::new(0),
        }
    }

    /// True when the file changed since the last check.
    fn check(&self) -> bool {
        let now = stamp_of(&self.path);
        let mut seen = self.stamp.lock();
        if now.is_some() && now != *seen {
            *seen = now;
            self.generation.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

struct OAuth {
    endpoint: Arc<oauth::TokenEndpoint>,
    cache: Arc<cache::TokenCache>,
    subject: Option<WatchedFile>,
    /// On behalf of a user: where the user's token comes from and its issuer's keys.
    user: Option<user::UserTokens>,
}

enum Provider {
    Jwt(JwtMinter),
    Static(StaticCred),
    OAuth(Box<OAuth>),
    Aws(Box<aws::AwsSource>),
    Stored(stores::StoredCred),
}

/// All credential sources, by name.
pub struct Credentials {
    providers: BTreeMap<String, Provider>,
    fingerprinter: Fingerprinter,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.providers.keys()).finish()
    }
}

fn read_static(source: &StaticSource, fp: &Fingerprinter) -> Result<StaticValue, CredentialError> {
    let (value, stamp) = match source {
        StaticSource::Env(var) => {
            let raw = std::env::var(var).map_err(|_| {
                CredentialError::Unavailable(format!("environment variable {var} is not set"))
            })?;
            (files::nonempty_secret(&raw, "static secret"), None)
        }
        // Stamp first: a change while reading is then seen by the next check.
        StaticSource::File(path) => (
            files::read_secret_file(path, "static secret"),
            stamp_of(path),
        ),
        StaticSource::Store(s) => {
            return Err(CredentialError::Config(format!(
                "{} is read in the background, not at start",
                s.describe()
            )));
        }
    };
    let value = value.map_err(CredentialError::Unavailable)?;
    Ok(StaticValue {
        fingerprint: fp.fingerprint(value.expose_secret().as_bytes()),
        value,
        stamp,
    })
}

/// What a static secret (from env, a file or a store) issues: the value, named by its
/// fingerprint; it never expires, which a route's `max_ttl` flags.
fn static_issued(
    name: &str,
    value: &SecretString,
    fingerprint: &str,
    call: &MintRequest<'_>,
) -> Issued {
    Issued {
        name: name.to_string(),
        kind: "static",
        value: value.clone(),
        id: format!("fp:{fingerprint}"),
        expires_at: None,
        scopes: call.scopes.to_vec(),
        flags: if call.max_ttl.is_some() {
            vec![flag::NO_EXPIRY]
        } else {
            Vec::new()
        },
        revoke: None,
    }
}

fn cache_metrics(metrics: &Arc<Metrics>, name: &str) -> cache::CacheMetrics {
    let lookup = |result| {
        metrics
            .token_cache
            .get_or_create(&CacheLabels {
                credential: name.to_string(),
                result,
            })
            .clone()
    };
    let (m, n) = (metrics.clone(), name.to_string());
    cache::CacheMetrics {
        hit: lookup("hit"),
        miss: lookup("miss"),
        backoff: lookup("backoff"),
        fetch_seconds: metrics
            .token_fetch_duration
            .get_or_create(&crate::metrics::CredentialName {
                credential: name.to_string(),
            })
            .clone(),
        fetch_result: Arc::new(move |result| {
            m.token_fetches
                .get_or_create(&FetchLabels {
                    credential: n.clone(),
                    result,
                })
                .clone()
        }),
    }
}

impl Credentials {
    /// Build every source; fails if a key, certificate or secret cannot be loaded. Token
    /// endpoints are reached directly.
    pub fn new(
        specs: &BTreeMap<String, CredentialSpec>,
        fingerprinter: Fingerprinter,
        tls: Arc<rustls::ClientConfig>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CredentialError> {
        Self::new_via(specs, fingerprinter, tls, metrics, &Egress::direct())
    }

    /// [`Credentials::new`], with token endpoints reached by `egress` (through the upstream
    /// proxy where it applies).
    pub(crate) fn new_via(
        specs: &BTreeMap<String, CredentialSpec>,
        fingerprinter: Fingerprinter,
        tls: Arc<rustls::ClientConfig>,
        metrics: Arc<Metrics>,
        egress: &Egress,
    ) -> Result<Self, CredentialError> {
        let mut providers = BTreeMap::new();
        for (name, spec) in specs {
            let p = match spec {
                CredentialSpec::Jwt(j) => Provider::Jwt(JwtMinter::new(j)?),
                CredentialSpec::OAuth(o) => Provider::OAuth(Box::new(OAuth {
                    endpoint: Arc::new(
                        oauth::TokenEndpoint::new((**o).clone(), &tls, egress)
                            .map_err(CredentialError::Config)?,
                    ),
                    cache: Arc::new(cache::TokenCache::new(name, cache_metrics(&metrics, name))),
                    subject: match &o.grant {
                        Grant::TokenExchange(x) => match &x.subject {
                            Subject::File(f) => Some(WatchedFile::new(f.clone())),
                            Subject::User(_) => None,
                        },
                        Grant::ClientCredentials | Grant::JwtBearer(_) => None,
                    },
                    user: match &o.grant {
                        Grant::TokenExchange(x) => match &x.subject {
                            Subject::User(u) => Some(user::UserTokens::new(
                                u.clone(),
                                oauth::endpoint_client((*tls).clone(), egress),
                                o.timeout,
                            )),
                            Subject::File(_) => None,
                        },
                        Grant::ClientCredentials | Grant::JwtBearer(_) => None,
                    },
                })),
                CredentialSpec::Aws(spec) => Provider::Aws(Box::new(aws::AwsSource::new(
                    spec.clone(),
                    &tls,
                    egress,
                    cache::TokenCache::new(name, cache_metrics(&metrics, name)),
                ))),
                CredentialSpec::Static {
                    source: StaticSource::Store(spec),
                    ..
                } => Provider::Stored(stores::StoredCred::new(spec.clone())),
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
            metrics,
        })
    }

    /// The JWKS document: public keys of every `jwt` credential, including retired keys
    /// whose tokens may still be in use.
    pub(crate) fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = self
            .providers
            .values()
            .filter_map(|p| match p {
                Provider::Jwt(m) => Some(m.jwks()),
                Provider::Static(_)
                | Provider::OAuth(_)
                | Provider::Aws(_)
                | Provider::Stored(_) => None,
            })
            .flatten()
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Obtain the named credential for one call, with its checks against the route.
    pub async fn obtain(
        &self,
        name: &str,
        call: &MintRequest<'_>,
    ) -> Result<Issued, CredentialError> {
        let mut issued = match self.providers.get(name) {
            None => return Err(CredentialError::Unknown(name.to_string())),
            Some(Provider::OAuth(o)) => self.fetch_cached(name, o, call).await?,
            Some(Provider::Aws(_)) => {
                return Err(CredentialError::Config(format!(
                    "credential `{name}` signs requests (kind aws); it has no value to inject"
                )));
            }
            Some(Provider::Jwt(m)) => {
                let t = m.mint(call)?;
                Issued {
                    name: name.to_string(),
                    kind: "jwt",
                    value: t.token,
                    id: t.jti,
                    expires_at: Some(t.exp),
                    scopes: t.scopes,
                    flags: Vec::new(),
                    revoke: None,
                }
            }
            Some(Provider::Static(s)) => {
                let v = s.current.read().clone();
                static_issued(name, &v.value, &v.fingerprint, call)
            }
            Some(Provider::Stored(s)) => {
                let v = s.value().map_err(CredentialError::Unavailable)?;
                static_issued(name, &v.value, &v.fingerprint, call)
            }
        };
        issued.flags.sort_unstable();
        for f in &issued.flags {
            self.metrics
                .credential_flags
                .get_or_create(&FlagLabels {
                    credential: name.to_string(),
                    flag: f,
                })
                .inc();
        }
        Ok(issued)
    }

    async fn fetch_cached(
        &self,
        name: &str,
        o: &OAuth,
        call: &MintRequest<'_>,
    ) -> Result<Issued, CredentialError> {
        // A JWT bearer grant whose assertion is another credential's token: that first.
        let chained = match &o.endpoint.spec.grant {
            Grant::JwtBearer(Assertion::From(other)) => {
                Some(Box::pin(self.obtain(other, call)).await?.value)
            }
            _ => None,
        };
        let params = TokenParams {
            audience: call.requested_audience,
            resource: call.resource,
            scopes: call.scopes,
            subject: chained.as_ref().or(call.user.map(|u| &u.token)),
        };
        // Keyed by everything the token is scoped to (and, for token exchange, the subject
        // token's generation), so a token is never handed to a request it was not issued
        // for. Scopes that name the purpose make the key per purpose.
        let generation = o
            .subject
            .as_ref()
            .map_or(0, |w| w.generation.load(Ordering::Acquire));
        let mut key = String::with_capacity(64);
        write!(key, "{generation}").expect("writing to a String");
        for part in [params.audience.unwrap_or(""), params.resource.unwrap_or("")] {
            key.push('\0');
            key.push_str(part);
        }
        for s in params.scopes {
            key.push('\0');
            key.push_str(s);
        }
        // A chained assertion: per assertion, so a new one is traded for a new token.
        if let Some(a) = &chained {
            key.push_str("\0assertion\0");
            key.push_str(&crate::fingerprint::sha256_hex(
                a.expose_secret().as_bytes(),
            ));
        }
        // DPoP: per key, so a token bound to a replaced key is never sent with new proofs.
        if let Some(k) = &o.endpoint.dpop {
            key.push_str("\0jkt\0");
            key.push_str(&k.jkt());
        }
        // On behalf of a user: per user token and purpose, never shared between users.
        if let Some(u) = call.user {
            key.push_str("\0user\0");
            key.push_str(&u.digest);
            key.push('\0');
            key.push_str(call.purpose);
        }
        // `per_call`: a token for this request alone, never cached.
        let (fetched, entry);
        let t: &oauth::Token = if o.endpoint.spec.per_call {
            // Boxed, as a cache miss is: inline, the HTTP exchange's future would make every
            // request's future that much larger.
            let outcome = Box::pin(o.endpoint.fetch(&params)).await;
            self.metrics
                .token_fetches
                .get_or_create(&FetchLabels {
                    credential: name.to_string(),
                    result: outcome.as_ref().map_or_else(|e| e.kind.as_str(), |_| "ok"),
                })
                .inc();
            fetched = outcome.map_err(|e| CredentialError::Unavailable(e.message))?;
            &fetched
        } else {
            entry = o
                .cache
                .get(key, || {
                    let endpoint = o.endpoint.clone();
                    let owned = oauth::OwnedParams::new(&params);
                    async move { endpoint.fetch(&owned.borrow()).await }
                })
                .await
                .map_err(CredentialError::Unavailable)?;
            &entry.token
        };
        let mut flags = Vec::new();
        if !t.unrequested_scopes.is_empty() {
            flags.push(flag::UNREQUESTED_SCOPE);
        }
        match (call.max_ttl, t.lifetime) {
            (Some(max), Some(life)) if life > max => flags.push(flag::TTL_EXCEEDS_MAX),
            (Some(_), None) => flags.push(flag::LIFETIME_UNKNOWN),
            _ => {}
        }
        Ok(Issued {
            name: name.to_string(),
            kind: o.endpoint.spec.kind(),
            value: t.value.clone(),
            id: t.jti.clone().unwrap_or_else(|| {
                format!(
                    "fp:{}",
                    self.fingerprinter
                        .fingerprint(t.value.expose_secret().as_bytes())
                )
            }),
            expires_at: Some(t.expires_at),
            scopes: t.scopes.clone(),
            flags,
            revoke: o
                .endpoint
                .spec
                .revocation_url
                .as_ref()
                .filter(|_| o.endpoint.spec.per_call)
                .map(|url| Revocation {
                    endpoint: o.endpoint.clone(),
                    url: url.clone(),
                    token: t.value.clone(),
                    credential: name.to_string(),
                    metrics: self.metrics.clone(),
                }),
        })
    }

    /// The origin (`scheme://host:port`) of `name`'s token endpoint, when it gets its tokens
    /// from an authorization server: what an MCP server's `authorization_servers` must name.
    pub(crate) fn token_origin(&self, name: &str) -> Option<String> {
        match self.providers.get(name) {
            Some(Provider::OAuth(o)) => {
                crate::mcp::auth::origin_of(&o.endpoint.spec.token_url.to_string())
            }
            _ => None,
        }
    }

    /// The DPoP key of `name`, when it is a DPoP credential.
    pub(crate) fn dpop_of(&self, name: &str) -> Option<&dpop::DpopKey> {
        match self.providers.get(name) {
            Some(Provider::OAuth(o)) => o.endpoint.dpop.as_ref(),
            _ => None,
        }
    }

    /// A response from an upstream a DPoP credential was sent to: remember the nonce it asks
    /// for (`DPoP-Nonce`); `true` when it refused the request for want of one
    /// (`WWW-Authenticate: DPoP error="use_dpop_nonce"`), so a request that can be sent again
    /// should be, once, with a new proof.
    pub(crate) fn dpop_answer(
        &self,
        route: &crate::route::Route,
        url: &str,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> bool {
        let Some(k) = route.credential.as_deref().and_then(|c| self.dpop_of(c)) else {
            return false;
        };
        let Some(nonce) = headers.get(dpop::DPOP_NONCE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        k.learn_nonce(url, nonce);
        status == http::StatusCode::UNAUTHORIZED
            && headers
                .get_all(http::header::WWW_AUTHENTICATE)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| v.contains(dpop::USE_DPOP_NONCE)))
    }

    /// A fresh DPoP proof (with the nonce just learnt) for a request about to be sent again:
    /// the token is the one already in its `Authorization`.
    pub(crate) fn dpop_reproof(
        &self,
        route: &crate::route::Route,
        htu: &str,
        head: &mut http::request::Parts,
    ) -> Result<(), crate::error::Rejection> {
        use crate::error::{ErrorCode, Rejection};
        let fail = || {
            Rejection::new(
                ErrorCode::CredentialUnavailable,
                "cannot make a DPoP proof for the retry",
            )
        };
        let k = route
            .credential
            .as_deref()
            .and_then(|c| self.dpop_of(c))
            .ok_or_else(fail)?;
        let token = head
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("DPoP "))
            .ok_or_else(fail)?;
        let proof = k
            .proof(head.method.as_str(), htu, Some(token))
            .ok()
            .and_then(|p| http::HeaderValue::from_str(&p).ok())
            .ok_or_else(fail)?;
        head.headers.insert("dpop", proof);
        Ok(())
    }

    /// On behalf of a user: for a route whose credential exchanges the user's token, take it
    /// out of `headers` and verify it (401 when it is missing or does not verify). `Ok(None)`
    /// for every other route.
    pub(crate) async fn user_for(
        &self,
        route: &crate::route::Route,
        headers: &mut http::HeaderMap,
    ) -> Result<Option<Delegation>, crate::error::Rejection> {
        use crate::error::{ErrorCode, Rejection};
        let Some(u) = route
            .credential
            .as_ref()
            .and_then(|c| match self.providers.get(c) {
                Some(Provider::OAuth(o)) => o.user.as_ref(),
                _ => None,
            })
        else {
            return Ok(None);
        };
        // Boxed, so the verification's future (a JWKS fetch on a key miss: ~2.4 KB) is made
        // only for the routes that exchange a user's token, not carried by every request's.
        Box::pin(u.take(headers))
            .await
            .map(Some)
            .map_err(|r| match r {
                user::Refusal::Missing(why) => Rejection::new(ErrorCode::UserTokenRequired, why),
                user::Refusal::Invalid(why) => Rejection::new(ErrorCode::UserTokenInvalid, why),
            })
    }

    /// For a credential that signs whole requests (`aws`), the largest body it can sign: the
    /// pipeline reads such a body whole first. `None` for the others, and for a body signed
    /// without being read (S3 over HTTPS: `UNSIGNED-PAYLOAD`, or the app's own unsigned
    /// `aws-chunked` framing), which streams.
    pub(crate) fn body_to_sign(
        &self,
        name: &str,
        route: &crate::route::Route,
        target: &crate::target::Target,
        headers: &http::HeaderMap,
        signed_for: Option<&(String, String)>,
    ) -> Option<usize> {
        let Some(Provider::Aws(a)) = self.providers.get(name) else {
            return None;
        };
        let streams = inject::signing_scope(route, target, signed_for, &a.spec.region).is_ok_and(
            |(service, _)| {
                // A refused framing is not read either: the credential stage says why.
                !matches!(
                    aws::streamed_payload(
                        &service,
                        target.scheme,
                        headers.get("x-amz-content-sha256")
                    ),
                    Ok(None)
                )
            },
        );
        (!streams).then_some(a.spec.body_max_bytes)
    }

    /// Pick up changed files: static secrets (the last good value stays on error), signing
    /// keys (rotation with overlap), subject tokens (a new generation of cached tokens).
    pub(crate) fn refresh_files(&self) {
        for (name, p) in &self.providers {
            match p {
                Provider::Static(s) => {
                    let StaticSource::File(path) = &s.source else {
                        continue;
                    };
                    let stamp = stamp_of(path);
                    let current = s.current.read().stamp;
                    if stamp.is_none() || stamp == current {
                        continue;
                    }
                    match read_static(&s.source, &self.fingerprinter) {
                        Ok(v) => {
                            tracing::info!(credential = %name, fingerprint = %v.fingerprint, "static secret reloaded");
                            *s.current.write() = Arc::new(v);
                        }
                        Err(e) => {
                            tracing::warn!(credential = %name, error = %e, "static secret reload failed; keeping the previous value")
                        }
                    }
                }
                Provider::Jwt(m) => m.maybe_rotate(),
                // The web identity token is read on every fetch; stores on their own clock.
                Provider::Aws(_) | Provider::Stored(_) => {}
                Provider::OAuth(o) => {
                    if let Some(w) = &o.subject
                        && w.check()
                    {
                        tracing::info!(credential = %name, "subject token changed; new tokens will be exchanged for it");
                    }
                    if let Some(k) = &o.endpoint.dpop {
                        k.maybe_rotate();
                    }
                }
            }
        }
    }

    /// Read every store-backed secret now, then every `refresh`; after a failed read, again
    /// sooner (1 s doubling up to `refresh`), keeping the last good value meanwhile.
    pub(crate) fn spawn_store_reads(self: &Arc<Self>) {
        for (name, p) in &self.providers {
            let Provider::Stored(s) = p else { continue };
            let refresh = s.spec.refresh;
            let me = Arc::downgrade(self);
            let name = name.clone();
            tokio::spawn(async move {
                let mut retry = Duration::from_secs(1);
                loop {
                    let Some(c) = me.upgrade() else { break };
                    let wait = match c.read_store(&name).await {
                        Some(true) => {
                            retry = Duration::from_secs(1);
                            refresh
                        }
                        _ => {
                            let w = retry.min(refresh);
                            retry = (retry * 2).min(refresh);
                            w
                        }
                    };
                    drop(c);
                    tokio::time::sleep(wait).await;
                }
            });
        }
    }

    /// Store-backed credentials with no value read yet (by name, sorted): until each has
    /// one, its routes fail closed, so the sidecar is not ready (`/readyz`). A value read
    /// once keeps it ready through a later outage (`max_stale` governs that).
    pub(crate) fn unread_stores(&self) -> Vec<&str> {
        let mut unread: Vec<&str> = self
            .providers
            .iter()
            .filter_map(|(name, p)| match p {
                Provider::Stored(s) if s.current.read().is_none() => Some(name.as_str()),
                _ => None,
            })
            .collect();
        unread.sort_unstable();
        unread
    }

    /// One read of store-backed credential `name`: `Some(true)` when it succeeded.
    async fn read_store(&self, name: &str) -> Option<bool> {
        let Some(Provider::Stored(s)) = self.providers.get(name) else {
            return None;
        };
        let Some(Provider::Aws(aws)) = self.providers.get(&s.spec.credential) else {
            return None; // refused by the config
        };
        let started = std::time::Instant::now();
        let outcome = stores::read(&s.spec, aws).await.map(|value| stores::Read {
            fingerprint: self
                .fingerprinter
                .fingerprint(value.expose_secret().as_bytes()),
            value,
            read_at: started,
        });
        let fingerprint = outcome.as_ref().ok().map(|r| r.fingerprint.clone());
        let result = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.kind.as_str(),
        };
        self.metrics
            .token_fetches
            .get_or_create(&FetchLabels {
                credential: name.to_string(),
                result,
            })
            .inc();
        let from = s.spec.describe();
        match s.record(outcome) {
            Ok(true) => {
                tracing::info!(credential = %name, from = %from, fingerprint = %fingerprint.unwrap_or_default(), "secret read from the store");
                Some(true)
            }
            Ok(false) => Some(true),
            Err(e) => {
                tracing::warn!(credential = %name, from = %from, error = %e, "reading the secret store failed; the last good value stays until max_stale");
                Some(false)
            }
        }
    }

    /// Check for changed files every `every`.
    pub(crate) fn spawn_file_watch(self: &Arc<Self>, every: Duration) {
        let needed = self.providers.values().any(|p| match p {
            Provider::Static(s) => matches!(s.source, StaticSource::File(_)),
            Provider::Jwt(m) => m.rotates(),
            Provider::OAuth(o) => o.subject.is_some() || o.endpoint.dpop.is_some(),
            Provider::Aws(_) | Provider::Stored(_) => false,
        });
        if !needed {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut checks = crate::files::OffLoop::new("credential files");
            loop {
                tick.tick().await;
                let Some(c) = me.upgrade() else { break };
                checks.run(move || c.refresh_files());
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
            requested_audience: None,
            resource: None,
            max_ttl: None,
            txn: "t",
            scopes: &[],
            workload: "w",
            stage: "main",
            environment: "e",
            purpose: "p",
            method: "GET",
            host: "h",
            path: "/",
            user: None,
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

//! Token endpoint client: OAuth 2.0 client credentials (RFC 6749 §4.4) and token exchange
//! (RFC 8693), with client authentication by secret (basic or post), by signed assertion
//! (`private_key_jwt`, RFC 7523) or by certificate (`tls_client_auth`, RFC 8705).
//!
//! Every file (client secret, assertion key, subject and actor tokens) is read when a token
//! is fetched, so a rotated file is used by the next fetch without a restart. Nothing secret
//! reaches an error text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::keys::{Allow, SigningKey};
use crate::files::{FileStamp, read_secret_file, stamp_of};

/// RFC 8693 §3 token type of a JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

/// How the client authenticates to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the client id and the secret in this file.
    Basic(PathBuf),
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post(PathBuf),
    /// `private_key_jwt` (RFC 7523 §2.2): an assertion signed with the key in this file.
    PrivateKeyJwt {
        /// PEM PKCS#8 key (Ed25519, P-256 or RSA).
        key_file: PathBuf,
        /// `aud` of the assertion; the token endpoint URL unless set.
        audience: String,
    },
    /// `tls_client_auth` (RFC 8705 §2): the client certificate authenticates; `client_id`
    /// goes in the body.
    TlsClientAuth {
        /// PEM certificate chain, leaf first.
        cert_file: PathBuf,
        /// PEM private key of the leaf.
        key_file: PathBuf,
    },
    /// `client_assertion` (RFC 7523 §2.2 with an assertion someone else issued): the JWT in
    /// this file is sent as it is, re-read on every fetch. Azure workload identity
    /// (`AZURE_FEDERATED_TOKEN_FILE`), MCP workload federation and CI OIDC tokens work so.
    AssertionFile(PathBuf),
    /// `none`: a public client; `client_id` in the body only.
    None,
}

/// RFC 8693 settings.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The subject token: the workload's own, or a user's from the request.
    pub(crate) subject: Subject,
    /// Its `subject_token_type`.
    pub(crate) subject_token_type: String,
    /// Optional actor token file and its type.
    pub(crate) actor: Option<(PathBuf, String)>,
    /// `requested_token_type`, if the route needs a specific one.
    pub(crate) requested_token_type: Option<String>,
    /// `audience` when the route names none (GCP's workload identity provider).
    pub(crate) audience: Option<String>,
    /// Trade the exchanged token for a service account's token.
    pub(crate) impersonate: Option<Impersonate>,
}

/// Whose token a token exchange sends as the subject.
#[derive(Debug, Clone)]
pub enum Subject {
    /// The workload's own (a projected service-account token, a JWT-SVID), from this file,
    /// re-read on every fetch.
    File(PathBuf),
    /// A user's, from the request, for an on-behalf-of exchange.
    User(UserSubject),
}

/// On behalf of a user: where the user's token comes from and how it is verified.
#[derive(Debug, Clone)]
pub struct UserSubject {
    /// The request header carrying it (removed before forwarding).
    pub header: http::HeaderName,
    /// JWKS it is verified against before it is sent anywhere.
    pub jwks_url: Option<Uri>,
    /// Expected `iss`.
    pub issuer: Option<String>,
    /// Expected `aud`.
    pub audience: Option<String>,
}

/// GCP service account impersonation: IAM Credentials `generateAccessToken`, authorized by
/// the exchanged (federated) token.
#[derive(Debug, Clone)]
pub struct Impersonate {
    /// The service account's email.
    pub service_account: String,
    /// IAM Credentials endpoint.
    pub endpoint: Uri,
    /// Lifetime asked for.
    pub lifetime: Duration,
}

/// GCP's IAM Credentials API.
pub const IAM_CREDENTIALS: &str = "https://iamcredentials.googleapis.com";

/// The scope a GCP access token needs when the route names none.
const GCP_CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Which grant the credential uses.
#[derive(Debug, Clone)]
pub enum Grant {
    /// `client_credentials`.
    ClientCredentials,
    /// `urn:ietf:params:oauth:grant-type:token-exchange`.
    TokenExchange(Box<Exchange>),
    /// `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 §2.1).
    JwtBearer(Assertion),
}

/// Where a JWT bearer grant's assertion comes from.
#[derive(Debug, Clone)]
pub enum Assertion {
    /// A file, re-read on every fetch.
    File(PathBuf),
    /// The token of another credential (an ID-JAG from a token exchange).
    From(String),
}

/// Settings of one token-endpoint credential.
#[derive(Debug, Clone)]
pub struct OAuthSpec {
    /// Credential name.
    pub name: String,
    /// Token endpoint.
    pub token_url: Uri,
    /// Client id.
    pub client_id: String,
    /// Client authentication.
    pub auth: ClientAuth,
    /// Grant.
    pub grant: Grant,
    /// Bound on one fetch, connect to response.
    pub timeout: Duration,
    /// DPoP (RFC 9449): ask for tokens bound to a key of ours, replaced this often.
    pub dpop: Option<Duration>,
    /// A token for each request, never cached.
    pub per_call: bool,
    /// With `per_call`: revoke each token (RFC 7009) at this endpoint once its response has
    /// ended.
    pub revocation_url: Option<Uri>,
}

impl OAuthSpec {
    /// `client_credentials` or `token_exchange`.
    pub(crate) fn kind(&self) -> &'static str {
        match self.grant {
            Grant::ClientCredentials => "client_credentials",
            Grant::TokenExchange(_) => "token_exchange",
            Grant::JwtBearer(_) => "jwt_bearer",
        }
    }
}

/// What one token request asks for.
#[derive(Debug, Clone, Copy)]
pub struct TokenParams<'a> {
    /// The route's audience (RFC 8693 `audience`; for client credentials it is sent as
    /// `resource` when the route sets no resource, as RFC 6749 has no audience parameter).
    pub(crate) audience: Option<&'a str>,
    /// The route's resource indicator (RFC 8707).
    pub(crate) resource: Option<&'a str>,
    /// Requested scopes.
    pub(crate) scopes: &'a [String],
    /// The user's token, for an on-behalf-of exchange.
    pub(crate) subject: Option<&'a SecretString>,
}

/// An owned [`TokenParams`], for refreshes that run after the request has gone.
#[derive(Debug, Clone)]
pub(crate) struct OwnedParams {
    audience: Option<String>,
    resource: Option<String>,
    scopes: Vec<String>,
    subject: Option<SecretString>,
}

impl OwnedParams {
    /// Copy borrowed parameters.
    pub(crate) fn new(p: &TokenParams<'_>) -> Self {
        OwnedParams {
            audience: p.audience.map(str::to_owned),
            resource: p.resource.map(str::to_owned),
            scopes: p.scopes.to_vec(),
            subject: p.subject.cloned(),
        }
    }

    /// Borrow them again.
    pub(crate) fn borrow(&self) -> TokenParams<'_> {
        TokenParams {
            audience: self.audience.as_deref(),
            resource: self.resource.as_deref(),
            scopes: &self.scopes,
            subject: self.subject.as_ref(),
        }
    }
}

/// A token and what may be logged about it.
#[derive(Debug)]
pub(crate) struct Token {
    /// The access token (or whatever `requested_token_type` asked for).
    pub(crate) value: SecretString,
    /// Its `jti` when it is a JWT.
    pub(crate) jti: Option<String>,
    /// Expiry (Unix seconds).
    pub(crate) expires_at: u64,
    /// Lifetime as issued, when the server said (`expires_in`) or the JWT shows (`exp - iat`).
    pub(crate) lifetime: Option<Duration>,
    /// Granted scopes: the response's `scope`, else the JWT's, else those requested.
    pub(crate) scopes: Vec<String>,
    /// Granted scopes that were not requested (empty when nothing was requested).
    pub(crate) unrequested_scopes: Vec<String>,
    /// When the request for it was sent.
    pub(crate) fetched_at: Instant,
}

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Failure {
    /// What kind of failure: the `result` label of the fetch metric.
    pub(crate) kind: FailureKind,
    /// Human-readable cause, free of secrets.
    pub(crate) message: String,
}

/// The kinds of token-fetch failure, a bounded metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// A file of ours (client secret, subject token, key) could not be read or was empty.
    Local,
    /// The token endpoint could not be reached.
    Unreachable,
    /// It did not answer in time.
    Timeout,
    /// It answered with an OAuth error.
    Rejected,
    /// It answered with something that is not a usable token response.
    InvalidResponse,
}

impl FailureKind {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureKind::Local => "local",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Timeout => "timeout",
            FailureKind::Rejected => "rejected",
            FailureKind::InvalidResponse => "invalid_response",
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
}

/// The secrets a token request carried (form values that hold them, and the Basic
/// credentials), so that nothing the server says back can relay one.
struct Sent(Vec<SecretString>);

/// Form fields whose values are secrets.
const SECRET_FIELDS: [&str; 6] = [
    "client_secret",
    "client_assertion",
    "assertion",
    "subject_token",
    "actor_token",
    "token",
];

/// The longest description relayed.
const DESCRIPTION_MAX: usize = 200;

impl Sent {
    fn of(form: &str, basic: Option<&http::HeaderValue>) -> Sent {
        let mut out: Vec<SecretString> = form_urlencoded::parse(form.as_bytes())
            .filter(|(k, v)| SECRET_FIELDS.contains(&k.as_ref()) && !v.is_empty())
            .map(|(_, v)| SecretString::from(v.into_owned()))
            .collect();
        if let Some(b64) = basic
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
        {
            out.push(SecretString::from(b64.to_string()));
            let pair = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            if let Some((_, secret)) = pair.as_deref().and_then(|p| p.split_once(':')) {
                out.push(SecretString::from(secret.to_string()));
                let decoded: String = form_urlencoded::parse(format!("s={secret}").as_bytes())
                    .map(|(_, v)| v.into_owned())
                    .collect();
                out.push(SecretString::from(decoded));
            }
        }
        Sent(out)
    }

    /// An authorization server's `error_description` as it may be relayed: RFC 6749's
    /// characters only (printable ASCII but `"` and `\`; anything else, newlines and escape
    /// sequences included, becomes `?`), at most [`DESCRIPTION_MAX`] of them, and withheld
    /// whole when it repeats any secret the request carried (a server that echoes its input)
    /// or holds anything shaped like a credential.
    fn relay(&self, description: &str) -> String {
        let repeats = self.0.iter().any(|s| {
            let s = s.expose_secret();
            s.len() >= 6 && description.contains(s)
        });
        if repeats || crate::strip::holds_credential(description) {
            return "description withheld: it repeats a secret".into();
        }
        let mut out: String = description
            .chars()
            .map(|c| match c {
                ' '..='~' if c != '"' && c != '\\' => c,
                _ => '?',
            })
            .take(DESCRIPTION_MAX)
            .collect();
        if description.chars().count() > DESCRIPTION_MAX {
            out.push_str("...");
        }
        out
    }
}

/// An OAuth error code as it may be relayed: RFC 6749's characters, at most 64 of them.
fn error_code(code: &str) -> &str {
    if code.is_empty() {
        return code;
    }
    let ok = code.len() <= 64
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        code
    } else {
        "(an error code that cannot be shown)"
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// HTTP client for a token endpoint, STS or a container credentials endpoint (HTTPS verified
/// against the configured roots, reached the way `egress` says).
pub(crate) type TokenClient =
    Client<hyper_rustls::HttpsConnector<crate::egress::Chain<HttpConnector>>, Full<Bytes>>;

/// A [`TokenClient`] with `tls`.
pub(crate) fn endpoint_client(
    tls: rustls::ClientConfig,
    egress: &crate::egress::Egress,
) -> TokenClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(egress.connector(http));
    Client::builder(TokioExecutor::new()).build(https)
}

/// Send `req` and read the whole answer within `timeout`; the failures name `what` (`token
/// endpoint`, `STS at URL`) and are the fetch metric's kinds.
pub(crate) async fn exchange(
    client: &TokenClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    what: &str,
) -> Result<(StatusCode, Bytes), Failure> {
    exchange_full(client, req, timeout, what)
        .await
        .map(|(status, _, body)| (status, body))
}

/// [`exchange`], with the answer's headers.
pub(crate) async fn exchange_full(
    client: &TokenClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    what: &str,
) -> Result<(StatusCode, http::HeaderMap, Bytes), Failure> {
    tokio::time::timeout(timeout, async {
        let resp = client.request(req).await.map_err(|e| Failure {
            kind: FailureKind::Unreachable,
            message: format!("{what} unreachable: {}", crate::error::innermost(&e)),
        })?;
        let status = resp.status();
        let (head, body) = resp.into_parts();
        let headers = head.headers;
        let body = body
            .collect()
            .await
            .map_err(|e| Failure {
                kind: FailureKind::Unreachable,
                message: format!("{what} response cut short: {e}"),
            })?
            .to_bytes();
        Ok((status, headers, body))
    })
    .await
    .map_err(|_| Failure {
        kind: FailureKind::Timeout,
        message: format!("{what} did not answer within {timeout:?}"),
    })?
}

/// One credential's token endpoint and its HTTP client.
pub(crate) struct TokenEndpoint {
    /// Settings.
    pub(crate) spec: OAuthSpec,
    client: TokenClient,
    /// With `dpop`: the key tokens are bound to.
    pub(crate) dpop: Option<super::dpop::DpopKey>,
}

impl std::fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// How long before `exp` a token stops being handed out: 10% of its lifetime, at least 10 s.
pub fn skew(lifetime: Duration) -> Duration {
    (lifetime / 10).max(Duration::from_secs(10))
}

fn read_secret(path: &Path, what: &str) -> Result<SecretString, Failure> {
    read_secret_file(path, what).map_err(|message| Failure {
        kind: FailureKind::Local,
        message,
    })
}

/// RFC 7523 §2.2 client authentication fields.
fn add_assertion(
    form: &mut form_urlencoded::Serializer<'_, String>,
    client_id: &str,
    assertion: &SecretString,
) {
    form.append_pair("client_id", client_id);
    form.append_pair(
        "client_assertion_type",
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    );
    form.append_pair("client_assertion", assertion.expose_secret());
}

/// A client certificate read from files, re-read when either file changes, so a renewed
/// certificate (cert-manager, SPIFFE X.509-SVID) is presented on the next connection.
#[derive(Debug)]
struct FileClientCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: RwLock<(CertStamps, Arc<rustls::sign::CertifiedKey>)>,
}

/// Stamps of the certificate and key files.
type CertStamps = (FileStamp, FileStamp);

fn load_cert(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<rustls::sign::CertifiedKey, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    rustls::sign::CertifiedKey::from_der(chain, key_der, provider)
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))
}

impl FileClientCert {
    fn new(
        cert_file: PathBuf,
        key_file: PathBuf,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, String> {
        let stamps = (stamp_of(&cert_file), stamp_of(&key_file));
        let ck = load_cert(&cert_file, &key_file, &provider)?;
        Ok(FileClientCert {
            cert_file,
            key_file,
            provider,
            current: RwLock::new((stamps, Arc::new(ck))),
        })
    }
}

impl rustls::client::ResolvesClientCert for FileClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let stamps = (stamp_of(&self.cert_file), stamp_of(&self.key_file));
        {
            let cur = self.current.read();
            // A missing file (mid-renewal) keeps the current pair.
            if stamps.0.is_none() || stamps.1.is_none() || cur.0 == stamps {
                return Some(cur.1.clone());
            }
        }
        match load_cert(&self.cert_file, &self.key_file, &self.provider) {
            Ok(ck) => {
                let ck = Arc::new(ck);
                *self.current.write() = (stamps, ck.clone());
                tracing::info!(cert = %self.cert_file.display(), "client certificate reloaded");
                Some(ck)
            }
            Err(e) => {
                // A half-written pair (cert renewed, key not yet): keep the previous pair.
                tracing::warn!(error = %e, "client certificate changed but cannot be loaded; keeping the previous one");
                Some(self.current.read().1.clone())
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl TokenEndpoint {
    /// The endpoint client; with `tls_client_auth`, one that presents the certificate.
    pub(crate) fn new(
        spec: OAuthSpec,
        tls: &Arc<rustls::ClientConfig>,
        egress: &crate::egress::Egress,
    ) -> Result<Self, String> {
        let mut tls = (**tls).clone();
        if let ClientAuth::TlsClientAuth {
            cert_file,
            key_file,
        } = &spec.auth
        {
            let provider = tls.crypto_provider().clone();
            tls.client_auth_cert_resolver = Arc::new(
                FileClientCert::new(cert_file.clone(), key_file.clone(), provider)
                    .map_err(|e| format!("credential `{}`: client certificate: {e}", spec.name))?,
            );
        }
        let dpop = match spec.dpop {
            Some(every) => Some(
                super::dpop::DpopKey::new(every)
                    .map_err(|e| format!("credential `{}`: DPoP key: {e}", spec.name))?,
            ),
            None => None,
        };
        Ok(TokenEndpoint {
            spec,
            client: endpoint_client(tls, egress),
            dpop,
        })
    }

    /// The form body and extra headers of one token request.
    fn request(&self, params: &TokenParams<'_>) -> Result<(Request<Full<Bytes>>, Sent), Failure> {
        let spec = &self.spec;
        let mut form = form_urlencoded::Serializer::new(String::new());
        match &spec.grant {
            Grant::ClientCredentials => {
                form.append_pair("grant_type", "client_credentials");
                // RFC 6749 has no audience parameter: the audience is asked for as a
                // resource indicator (RFC 8707) unless the route names one itself.
                if let Some(r) = params.resource.or(params.audience) {
                    form.append_pair("resource", r);
                }
            }
            Grant::JwtBearer(a) => {
                form.append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer");
                let assertion = match (a, params.subject) {
                    (Assertion::File(f), _) => read_secret(f, "assertion")?,
                    (Assertion::From(_), Some(t)) => t.clone(),
                    (Assertion::From(other), None) => {
                        return Err(Failure {
                            kind: FailureKind::Local,
                            message: format!("no assertion from credential `{other}`"),
                        });
                    }
                };
                form.append_pair("assertion", assertion.expose_secret());
                if let Some(r) = params.resource.or(params.audience) {
                    form.append_pair("resource", r);
                }
            }
            Grant::TokenExchange(x) => {
                form.append_pair(
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                );
                let subject = match (&x.subject, params.subject) {
                    (Subject::File(f), _) => read_secret(f, "subject token")?,
                    (Subject::User(_), Some(user)) => user.clone(),
                    (Subject::User(_), None) => {
                        return Err(Failure {
                            kind: FailureKind::Local,
                            message: "no user token for an on-behalf-of exchange".into(),
                        });
                    }
                };
                form.append_pair("subject_token", subject.expose_secret());
                form.append_pair("subject_token_type", &x.subject_token_type);
                if let Some((file, ty)) = &x.actor {
                    let actor = read_secret(file, "actor token")?;
                    form.append_pair("actor_token", actor.expose_secret());
                    form.append_pair("actor_token_type", ty);
                }
                if let Some(t) = &x.requested_token_type {
                    form.append_pair("requested_token_type", t);
                }
                if let Some(a) = params.audience.or(x.audience.as_deref()) {
                    form.append_pair("audience", a);
                }
                if let Some(r) = params.resource {
                    form.append_pair("resource", r);
                }
            }
        }
        if !params.scopes.is_empty() {
            form.append_pair("scope", &params.scopes.join(" "));
        }
        let basic = self.authenticate(&mut form)?;
        let mut req = Request::post(spec.token_url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        let form = form.finish();
        let sent = Sent::of(&form, basic.as_ref());
        if let Some(v) = basic {
            req = req.header(header::AUTHORIZATION, v);
        }
        req.body(Full::new(Bytes::from(form)))
            .map(|r| (r, sent))
            .map_err(|e| Failure {
                kind: FailureKind::Local,
                message: e.to_string(),
            })
    }

    /// Client authentication (RFC 6749 §2.3, RFC 7523, RFC 8705) into `form`, or the Basic
    /// `Authorization` value it takes; the same for token and revocation requests.
    fn authenticate(
        &self,
        form: &mut form_urlencoded::Serializer<'_, String>,
    ) -> Result<Option<http::HeaderValue>, Failure> {
        let spec = &self.spec;
        let mut basic = None;
        match &spec.auth {
            ClientAuth::Basic(file) => {
                let secret = read_secret(file, "client secret")?;
                // RFC 6749 §2.3.1: both parts form-urlencoded before Base64.
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&spec.client_id), enc(secret.expose_secret()));
                let mut v = http::HeaderValue::from_str(&format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
                .map_err(|_| Failure {
                    kind: FailureKind::Local,
                    message: "client credentials are not a valid header value".into(),
                })?;
                v.set_sensitive(true);
                basic = Some(v);
            }
            ClientAuth::Post(file) => {
                let secret = read_secret(file, "client secret")?;
                form.append_pair("client_id", &spec.client_id);
                form.append_pair("client_secret", secret.expose_secret());
            }
            ClientAuth::PrivateKeyJwt { key_file, audience } => {
                let assertion = self.client_assertion(key_file, audience)?;
                add_assertion(form, &spec.client_id, &assertion);
            }
            ClientAuth::AssertionFile(file) => {
                let assertion = read_secret(file, "client assertion")?;
                add_assertion(form, &spec.client_id, &assertion);
            }
            ClientAuth::TlsClientAuth { .. } => {
                form.append_pair("client_id", &spec.client_id);
            }
            ClientAuth::None => {
                // A public client names itself when it has a name (GCP's STS takes none).
                if !spec.client_id.is_empty() {
                    form.append_pair("client_id", &spec.client_id);
                }
            }
        }
        Ok(basic)
    }

    /// Revoke `token` (RFC 7009 §2.1), authenticated as for the token endpoint. A 200 is
    /// success whatever the body (§2.2: also for a token the server no longer knows).
    pub(crate) async fn revoke(
        self: &Arc<Self>,
        url: &Uri,
        token: &SecretString,
    ) -> Result<(), Failure> {
        // Client authentication reads secret files: off the event loop, as for a fetch.
        let (me, token) = (self.clone(), token.clone());
        let within = self.spec.timeout;
        let built = tokio::task::spawn_blocking(move || {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("token", token.expose_secret());
            form.append_pair("token_type_hint", "access_token");
            let basic = me.authenticate(&mut form)?;
            Ok::<_, Failure>((form.finish(), basic))
        });
        let (body, basic) = match tokio::time::timeout(within, built).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => {
                return Err(Failure {
                    kind: FailureKind::Local,
                    message: format!("building the revocation request failed: {e}"),
                });
            }
            Err(_) => {
                return Err(Failure {
                    kind: FailureKind::Timeout,
                    message: format!(
                        "the client's secret files could not be read within {within:?}"
                    ),
                });
            }
        };
        let mut req = Request::post(url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(v) = basic {
            req = req.header(header::AUTHORIZATION, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure {
                kind: FailureKind::Local,
                message: e.to_string(),
            })?;
        let what = format!("revocation endpoint {url}");
        let (status, body) = exchange(&self.client, req, self.spec.timeout, &what).await?;
        if status == StatusCode::OK {
            return Ok(());
        }
        let why = serde_json::from_slice::<ErrorResponse>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| "no OAuth error body".into());
        Err(Failure {
            kind: if status.is_server_error() {
                FailureKind::Unreachable
            } else {
                FailureKind::Rejected
            },
            message: format!("{what} answered {status}: {why}"),
        })
    }

    /// RFC 7523 §3: iss = sub = client id, aud = the token endpoint, short-lived, unique jti.
    fn client_assertion(&self, key_file: &Path, audience: &str) -> Result<SecretString, Failure> {
        let local = |message: String| Failure {
            kind: FailureKind::Local,
            message,
        };
        let pem = std::fs::read(key_file).map_err(|e| {
            local(format!(
                "cannot read the client key file {}: {e}",
                key_file.display()
            ))
        })?;
        let key = SigningKey::from_pem(&pem, Allow::AnyIncludingRsa)
            .map_err(|e| local(format!("client key {}: {e}", key_file.display())))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = serde_json::json!({
            "iss": self.spec.client_id,
            "sub": self.spec.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": uuid::Uuid::new_v4().simple().to_string(),
        });
        key.compact("JWT", &claims)
            .map(SecretString::from)
            .map_err(|e| local(e.to_string()))
    }

    /// Fetch one token.
    /// Build the token request off the event loop, within the endpoint's timeout: it reads
    /// secret files (client secret, key, assertion, subject and actor tokens), and a file that
    /// blocks (a FIFO, a hung network mount) must hold up one blocking-pool thread, never a
    /// worker's other requests, and fail this fetch closed when the deadline passes.
    async fn request_off_loop(
        self: &Arc<Self>,
        params: &TokenParams<'_>,
    ) -> Result<(Request<Full<Bytes>>, Sent), Failure> {
        let me = self.clone();
        let owned = OwnedParams::new(params);
        let within = self.spec.timeout;
        let built = tokio::task::spawn_blocking(move || me.request(&owned.borrow()));
        match tokio::time::timeout(within, built).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Failure {
                kind: FailureKind::Local,
                message: format!("building the token request failed: {e}"),
            }),
            Err(_) => Err(Failure {
                kind: FailureKind::Timeout,
                message: format!(
                    "the token request's secret files could not be read within {within:?} (a file that blocks: a FIFO, a hung mount?)"
                ),
            }),
        }
    }

    pub(crate) async fn fetch(
        self: &Arc<Self>,
        params: &TokenParams<'_>,
    ) -> Result<Token, Failure> {
        let spec = &self.spec;
        let started = Instant::now();
        let mut retried = false;
        let (status, body, sent) = loop {
            let (mut req, sent) = self.request_off_loop(params).await?;
            let htu = self.token_htu();
            if let Some(k) = &self.dpop {
                let proof = k.proof("POST", &htu, None).map_err(|e| Failure {
                    kind: FailureKind::Local,
                    message: format!("DPoP proof: {e}"),
                })?;
                if let Ok(v) = http::HeaderValue::from_str(&proof) {
                    req.headers_mut().insert("dpop", v);
                }
            }
            let (status, headers, body) =
                exchange_full(&self.client, req, spec.timeout, "token endpoint").await?;
            // RFC 9449 §8: a server that wants a nonce says which, and the request is made
            // again once with it.
            if let (Some(k), Some(n)) = (
                &self.dpop,
                headers
                    .get(super::dpop::DPOP_NONCE)
                    .and_then(|v| v.to_str().ok()),
            ) {
                k.learn_nonce(&htu, n);
                let wants_nonce = status == StatusCode::BAD_REQUEST
                    && serde_json::from_slice::<ErrorResponse>(&body)
                        .is_ok_and(|e| e.error == super::dpop::USE_DPOP_NONCE);
                if wants_nonce && !retried {
                    retried = true;
                    continue;
                }
            }
            break (status, body, sent);
        };
        if status != StatusCode::OK {
            // The server's own words reach the line and the 503 only as far as they are safe
            // to: the error code, and a bounded description that repeats nothing sent.
            let why = serde_json::from_slice::<ErrorResponse>(&body)
                .map(|e| {
                    format!(
                        "{}{}",
                        error_code(&e.error),
                        e.error_description
                            .map(|d| format!(" ({})", sent.relay(&d)))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_else(|_| "no OAuth error body".into());
            return Err(Failure {
                kind: FailureKind::Rejected,
                message: format!("token endpoint answered {status}: {why}"),
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| Failure {
            kind: FailureKind::InvalidResponse,
            message: format!("token response is not valid JSON: {e}"),
        })?;
        if parsed.access_token.is_empty() {
            return Err(Failure {
                kind: FailureKind::InvalidResponse,
                message: "token response has an empty access_token".into(),
            });
        }
        // A DPoP credential must get a bound token: a bearer token would be sent as if it
        // were bound, and anyone holding it could use it.
        if self.dpop.is_some()
            && !parsed
                .token_type
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("DPoP"))
        {
            return Err(Failure {
                kind: FailureKind::InvalidResponse,
                message: format!(
                    "asked for a DPoP-bound token, the token endpoint issued token_type {}",
                    parsed.token_type.as_deref().unwrap_or("(none)")
                ),
            });
        }
        let token = token_from(parsed, params.scopes, started);
        match &spec.grant {
            Grant::TokenExchange(x) => match &x.impersonate {
                Some(imp) => self.impersonate(imp, &token, params.scopes).await,
                None => Ok(token),
            },
            Grant::ClientCredentials | Grant::JwtBearer(_) => Ok(token),
        }
    }

    /// The token endpoint's URL without query or fragment: a DPoP proof's `htu`.
    fn token_htu(&self) -> String {
        let u = &self.spec.token_url;
        format!(
            "{}://{}{}",
            u.scheme_str().unwrap_or("https"),
            u.authority().map_or("", |a| a.as_str()),
            u.path()
        )
    }

    /// IAM Credentials `generateAccessToken` for `imp.service_account`, authorized by the
    /// federated token: the service account's access token, with its `expireTime`.
    async fn impersonate(
        &self,
        imp: &Impersonate,
        federated: &Token,
        scopes: &[String],
    ) -> Result<Token, Failure> {
        let base = imp.endpoint.to_string();
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{}:generateAccessToken",
            base.trim_end_matches('/'),
            form_urlencoded::byte_serialize(imp.service_account.as_bytes()).collect::<String>()
        );
        let scopes: Vec<&str> = if scopes.is_empty() {
            vec![GCP_CLOUD_PLATFORM]
        } else {
            scopes.iter().map(String::as_str).collect()
        };
        let body = serde_json::json!({
            "scope": scopes,
            "lifetime": format!("{}s", imp.lifetime.as_secs()),
        });
        let local = |message: String| Failure {
            kind: FailureKind::Local,
            message,
        };
        let mut bearer =
            http::HeaderValue::from_str(&format!("Bearer {}", federated.value.expose_secret()))
                .map_err(|_| local("the exchanged token is not a valid header value".into()))?;
        bearer.set_sensitive(true);
        let req = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, bearer)
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| local(e.to_string()))?;
        let started = Instant::now();
        let what = format!("IAM Credentials at {base}");
        let (status, answer) = exchange(&self.client, req, self.spec.timeout, &what).await?;
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        if !status.is_success() {
            // Google's error shape: {"error": {"code", "message", "status"}}, relayed as an
            // authorization server's description is.
            let e = &v["error"];
            let sent = Sent(vec![federated.value.clone()]);
            return Err(Failure {
                kind: FailureKind::Rejected,
                message: format!(
                    "{what} refused generateAccessToken for {} ({status}): {} {}",
                    imp.service_account,
                    error_code(e["status"].as_str().unwrap_or("")),
                    sent.relay(e["message"].as_str().unwrap_or(""))
                )
                .trim_end()
                .to_string(),
            });
        }
        let invalid = |message: String| Failure {
            kind: FailureKind::InvalidResponse,
            message,
        };
        let value = v["accessToken"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid(format!("{what} answered without an accessToken")))?;
        let expire = v["expireTime"]
            .as_str()
            .ok_or_else(|| invalid(format!("{what} answered without an expireTime")))?;
        let expires = humantime::parse_rfc3339_weak(expire)
            .map_err(|e| invalid(format!("{what}: expireTime `{expire}`: {e}")))?;
        let expires_at = expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Token {
            value: SecretString::from(value.to_string()),
            jti: None,
            expires_at,
            lifetime: expires.duration_since(SystemTime::now()).ok(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            unrequested_scopes: Vec::new(),
            fetched_at: started,
        })
    }
}

/// The longest lifetime a token is taken to have (ten years); longer ones are flagged by
/// `max_ttl` like any long-lived credential, and cached as long as any.
const LONGEST_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Interpret a successful response. A JWT's own claims fill what the response leaves out.
fn token_from(parsed: TokenResponse, requested: &[String], started: Instant) -> Token {
    let claims = jwt_payload(&parsed.access_token);
    let claim_u64 = |k: &str| claims.as_ref().and_then(|c| c.get(k)?.as_u64());
    let jwt_lifetime = claim_u64("exp")
        .zip(claim_u64("iat"))
        .map(|(e, i)| Duration::from_secs(e.saturating_sub(i)));
    // `expires_in` and `exp` are the server's word: bounded before any arithmetic (a lifetime
    // of 2^64-1 seconds once panicked the request).
    let lifetime = parsed
        .expires_in
        .map(Duration::from_secs)
        .or(jwt_lifetime)
        .map(|l| l.min(LONGEST_LIFETIME));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Without any lifetime information, assume a minute: short enough to be safe.
    let cache_life = lifetime.unwrap_or(Duration::from_secs(60));
    let scopes: Vec<String> = parsed
        .scope
        .or_else(|| {
            claims
                .as_ref()
                .and_then(|c| c.get("scope")?.as_str().map(str::to_owned))
        })
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_else(|| requested.to_vec());
    let unrequested_scopes = if requested.is_empty() {
        Vec::new()
    } else {
        scopes
            .iter()
            .filter(|s| !requested.contains(s))
            .cloned()
            .collect()
    };
    Token {
        jti: claims
            .as_ref()
            .and_then(|c| c.get("jti")?.as_str().map(str::to_owned)),
        value: SecretString::from(parsed.access_token),
        expires_at: claim_u64("exp").unwrap_or(now.saturating_add(cache_life.as_secs())),
        lifetime,
        scopes,
        unrequested_scopes,
        fetched_at: started,
    }
}

/// A JWT's payload, read without verification (for logging and checks only: the token is
/// the authorization server's word to the upstream, which verifies it).
fn jwt_payload(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_ten_percent_at_least_ten_seconds() {
        assert_eq!(skew(Duration::from_secs(3600)), Duration::from_secs(360));
        assert_eq!(skew(Duration::from_secs(60)), Duration::from_secs(10));
    }

    fn jwt(claims: serde_json::Value) -> String {
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b(br#"{"alg":"none"}"#),
            b(claims.to_string().as_bytes())
        )
    }

    fn response(token: String, expires_in: Option<u64>, scope: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: token,
            token_type: None,
            expires_in,
            scope: scope.map(str::to_owned),
        }
    }

    #[test]
    fn jwt_claims_fill_what_the_response_leaves_out() {
        let requested = vec!["tools.read".to_string()];
        let t = token_from(
            response(
                jwt(
                    serde_json::json!({"jti":"abc","iat":1000,"exp":4600,"scope":"tools.read admin"}),
                ),
                None,
                None,
            ),
            &requested,
            Instant::now(),
        );
        assert_eq!(t.jti.as_deref(), Some("abc"));
        assert_eq!(t.lifetime, Some(Duration::from_secs(3600)));
        assert_eq!(t.expires_at, 4600);
        assert_eq!(t.scopes, ["tools.read", "admin"]);
        assert_eq!(
            t.unrequested_scopes,
            ["admin"],
            "a broader grant is noticed"
        );
    }

    #[test]
    fn an_error_description_is_relayed_only_as_far_as_it_is_safe() {
        let basic = http::HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("chaperone:s3cr%2Bet-value")
        ))
        .unwrap();
        let sent = Sent::of(
            "grant_type=client_credentials&client_secret=post-secret-123&subject_token=eyJhbGciOi.subject.token&scope=tools.read",
            Some(&basic),
        );
        for echo in [
            "client_secret post-secret-123 is wrong",
            "bad subject eyJhbGciOi.subject.token",
            "credentials chaperone:s3cr+et-value rejected",
            "raw s3cr%2Bet-value",
            "header Y2hhcGVyb25lOnMzY3IlMkJldC12YWx1ZQ== rejected",
            "someone's key sk-proj-abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV0123456789abcd",
        ] {
            assert_eq!(
                sent.relay(echo),
                "description withheld: it repeats a secret",
                "{echo}"
            );
        }
        assert_eq!(
            sent.relay("scope tools.read is not allowed"),
            "scope tools.read is not allowed",
            "an ordinary description is relayed; the scope asked for is no secret"
        );
        assert_eq!(
            sent.relay("line\nbreak \u{1b}[31m\"x\""),
            "line?break ?[31m?x?"
        );
        let long = sent.relay(&"a".repeat(1000));
        assert_eq!(long.len(), DESCRIPTION_MAX + 3);
        assert_eq!(error_code("invalid_client"), "invalid_client");
        assert_eq!(
            error_code("bad\ncode"),
            "(an error code that cannot be shown)"
        );
        assert_eq!(
            error_code(&"e".repeat(65)),
            "(an error code that cannot be shown)"
        );
    }

    #[test]
    fn absurd_lifetimes_are_bounded_not_panicked_on() {
        let t = token_from(
            response("opaque".into(), Some(u64::MAX), None),
            &[],
            Instant::now(),
        );
        assert_eq!(t.lifetime, Some(LONGEST_LIFETIME));
        let t = token_from(
            response(
                jwt(serde_json::json!({"iat": 0, "exp": u64::MAX})),
                None,
                None,
            ),
            &[],
            Instant::now(),
        );
        assert_eq!(t.lifetime, Some(LONGEST_LIFETIME));
        assert_eq!(t.expires_at, u64::MAX, "logged as the server said");
        // And cached without overflow (the cache bounds it again).
        let _ = super::super::cache::Entry::new(t);
    }

    #[test]
    fn opaque_tokens_use_the_response_alone() {
        let requested = vec!["a".to_string(), "b".to_string()];
        let t = token_from(
            response("opaque-token".into(), Some(300), Some("a")),
            &requested,
            Instant::now(),
        );
        assert_eq!(t.jti, None);
        assert_eq!(t.lifetime, Some(Duration::from_secs(300)));
        assert_eq!(t.scopes, ["a"]);
        assert!(t.unrequested_scopes.is_empty(), "narrower is fine");
        let t = token_from(response("x".into(), None, None), &[], Instant::now());
        assert_eq!(t.lifetime, None, "unknown lifetime stays unknown");
        assert!(t.unrequested_scopes.is_empty());
    }
}

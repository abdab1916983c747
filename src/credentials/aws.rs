//! `kind: aws`: short-lived AWS session credentials, and SigV4 signing with them.
//!
//! Session credentials come from STS `AssumeRoleWithWebIdentity` (EKS IRSA: a role ARN and a
//! projected service-account token, re-read on every fetch), cached and refreshed ahead of
//! their expiry by the same cache as the OAuth tokens (one fetch for concurrent misses, fail
//! closed, backoff). The STS call is a plain form POST with no signature (the web identity
//! token is the proof), made through the same way out as every other connection; its XML
//! answer has four fields we need, read by [`xml_text`] rather than a general XML parser.
//!
//! A route whose credential is `aws` is signed rather than given a header: the app's own
//! signature headers go, and the request is signed with the session (AWS's `aws-sigv4` crate
//! does the canonicalisation), for the service and region its host names
//! ([`scope_of`]) or its route's `sign:` says.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use http_body_util::Full;
use secrecy::{ExposeSecret, SecretString};

use super::cache::{Fetched, TokenCache};
use super::oauth::{Failure, FailureKind, exchange};
use crate::egress::Egress;

/// Validated `kind: aws` settings.
#[derive(Debug, Clone)]
pub struct AwsSpec {
    /// Credential name.
    pub name: String,
    /// The region signed for when the host does not say.
    pub region: String,
    /// Where session credentials come from.
    pub source: SessionSource,
    /// Largest request body signed (the signature covers the body's hash).
    pub body_max_bytes: usize,
    /// How long fetching a session may take.
    pub timeout: Duration,
}

/// Where an `aws` credential's sessions come from.
#[derive(Debug, Clone)]
pub enum SessionSource {
    /// STS `AssumeRoleWithWebIdentity` (EKS IRSA).
    WebIdentity {
        /// The role to assume.
        role_arn: String,
        /// The web identity token (re-read on every fetch).
        web_identity_token_file: PathBuf,
        /// STS endpoint.
        sts_endpoint: Uri,
        /// Session lifetime asked for.
        session_duration: Duration,
        /// Role session name (shows in the assumed role's ARN and in CloudTrail).
        session_name: String,
    },
    /// The container credentials endpoint (EKS Pod Identity, ECS): a GET to `uri` with the
    /// authorization token, read from `token_file` on every fetch, when there is one.
    Container {
        /// `AWS_CONTAINER_CREDENTIALS_FULL_URI` (or ECS's relative one on 169.254.170.2).
        uri: Uri,
        /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
        token_file: Option<PathBuf>,
    },
}

/// One set of session credentials.
pub struct Session {
    pub(crate) access_key_id: String,
    secret_access_key: SecretString,
    session_token: SecretString,
    /// The assumed role session's ARN: what the log line names.
    pub(crate) assumed_role: String,
    /// Expiry (Unix seconds).
    pub(crate) expires_at: u64,
    lifetime: Option<Duration>,
    fetched_at: Instant,
}

impl Session {
    /// Session credentials as STS issued them (for the signing benchmark and tests; the
    /// sidecar gets its own from STS).
    pub fn new(access_key_id: &str, secret_access_key: &str, session_token: &str) -> Session {
        Session {
            access_key_id: access_key_id.to_string(),
            secret_access_key: SecretString::from(secret_access_key.to_string()),
            session_token: SecretString::from(session_token.to_string()),
            assumed_role: String::new(),
            expires_at: 0,
            lifetime: None,
            fetched_at: Instant::now(),
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("assumed_role", &self.assumed_role)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Fetched for Session {
    fn fetched_at(&self) -> Instant {
        self.fetched_at
    }
    fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

/// STS and the container endpoint are fetched like token endpoints.
type StsClient = super::oauth::TokenClient;

/// One `aws` credential: its settings, its STS client, its session cache.
pub(crate) struct AwsSource {
    pub(crate) spec: AwsSpec,
    client: StsClient,
    pub(crate) cache: Arc<TokenCache<Session>>,
}

impl std::fmt::Debug for AwsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsSource")
            .field("name", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl AwsSource {
    pub(crate) fn new(
        spec: AwsSpec,
        tls: &Arc<rustls::ClientConfig>,
        egress: &Egress,
        cache: TokenCache<Session>,
    ) -> AwsSource {
        AwsSource {
            spec,
            client: super::oauth::endpoint_client((**tls).clone(), egress),
            cache: Arc::new(cache),
        }
    }

    /// The current session, fetched when there is none (fail closed).
    pub(crate) async fn session(&self) -> Result<Arc<super::cache::Entry<Session>>, String> {
        self.cache
            .get(String::new(), || {
                let (spec, client) = (self.spec.clone(), self.client.clone());
                async move {
                    match &spec.source {
                        SessionSource::WebIdentity { .. } => {
                            assume_role_with_web_identity(&spec, &client).await
                        }
                        SessionSource::Container { uri, token_file } => {
                            container_credentials(uri, token_file.as_ref(), spec.timeout, &client)
                                .await
                        }
                    }
                }
            })
            .await
    }
}

impl AwsSource {
    /// One call to an AWS JSON API (`X-Amz-Target` protocol: Secrets Manager, SSM) at
    /// `endpoint` for `service`, signed with the current session; the answer's JSON. Errors
    /// carry AWS's error type and message, never a secret.
    pub(crate) async fn json_call(
        &self,
        service: &str,
        endpoint: &Uri,
        target: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, Failure> {
        let session = self
            .session()
            .await
            .map_err(|e| failure(FailureKind::Unreachable, e))?;
        let body = Bytes::from(body.to_string());
        let authority = endpoint
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| failure(FailureKind::Local, format!("{endpoint} has no host")))?;
        let region = scope_of(endpoint.host().unwrap_or_default())
            .map_or_else(|| self.spec.region.clone(), |(_, r)| r);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-amz-json-1.1"),
        );
        headers.insert(
            HeaderName::from_static("x-amz-target"),
            HeaderValue::from_str(target)
                .map_err(|e| failure(FailureKind::Local, e.to_string()))?,
        );
        let url = endpoint.to_string();
        sign(
            &session.token,
            &ToSign {
                service,
                region: &region,
                method: "POST",
                url: &url,
                authority: &authority,
                body: Payload::Bytes(&body),
                time: SystemTime::now(),
            },
            &mut headers,
        )
        .map_err(|e| failure(FailureKind::Local, e))?;
        let mut req = Request::post(endpoint.clone())
            .body(Full::new(body))
            .map_err(|e| failure(FailureKind::Local, e.to_string()))?;
        *req.headers_mut() = headers;
        let what = format!("{service} at {endpoint}");
        let (status, answer) = exchange(&self.client, req, self.spec.timeout, &what).await?;
        let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| {
            failure(
                FailureKind::InvalidResponse,
                format!("{what} answered {status} with something that is not JSON: {e}"),
            )
        })?;
        if !status.is_success() {
            // `__type` is `namespace#Code` or `Code`; `message`/`Message` explains.
            let code = v["__type"].as_str().unwrap_or("");
            let code = code.rsplit('#').next().unwrap_or(code);
            let message = v["message"]
                .as_str()
                .or(v["Message"].as_str())
                .unwrap_or("");
            return Err(failure(
                FailureKind::Rejected,
                format!("{what} refused {target} ({status}): {code} {message}")
                    .trim_end()
                    .to_string(),
            ));
        }
        Ok(v)
    }
}

fn failure(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure {
        kind,
        message: message.into(),
    }
}

/// A token file's content, trimmed; an error naming `what` when it cannot be read or is
/// empty. Read off the event loop within `within`, and only when it is a regular file: a
/// FIFO or a hung mount fails this fetch, never a worker's other requests.
async fn read_token(
    path: &std::path::Path,
    what: &str,
    within: Duration,
) -> Result<String, Failure> {
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || crate::files::read_regular(&owned));
    let bytes = match tokio::time::timeout(within, read).await {
        Ok(Ok(Ok(b))) => b,
        Ok(Ok(Err(e))) => {
            return Err(failure(
                FailureKind::Local,
                format!("cannot read the {what} {}: {e}", path.display()),
            ));
        }
        Ok(Err(e)) => {
            return Err(failure(
                FailureKind::Local,
                format!("reading the {what} {} failed: {e}", path.display()),
            ));
        }
        Err(_) => {
            return Err(failure(
                FailureKind::Timeout,
                format!(
                    "the {what} {} could not be read within {within:?}",
                    path.display()
                ),
            ));
        }
    };
    let token = String::from_utf8_lossy(&bytes);
    let token = token.trim();
    if token.is_empty() {
        return Err(failure(
            FailureKind::Local,
            format!("the {what} {} is empty", path.display()),
        ));
    }
    Ok(token.to_string())
}

/// An RFC 3339 expiry: Unix seconds, and how long from now.
fn expiry(expiration: &str) -> Result<(u64, Option<Duration>), Failure> {
    let expires = humantime::parse_rfc3339_weak(expiration).map_err(|e| {
        failure(
            FailureKind::InvalidResponse,
            format!("the credentials' expiration `{expiration}`: {e}"),
        )
    })?;
    let at = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((at, expires.duration_since(SystemTime::now()).ok()))
}

/// STS `AssumeRoleWithWebIdentity` (an unsigned form POST; the token is the proof).
async fn assume_role_with_web_identity(
    spec: &AwsSpec,
    client: &StsClient,
) -> Result<Session, Failure> {
    let SessionSource::WebIdentity {
        role_arn,
        web_identity_token_file,
        sts_endpoint,
        session_duration,
        session_name,
    } = &spec.source
    else {
        return Err(failure(FailureKind::Local, "not a web identity credential"));
    };
    let token = read_token(web_identity_token_file, "web identity token", spec.timeout).await?;
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("Action", "AssumeRoleWithWebIdentity")
        .append_pair("Version", "2011-06-15")
        .append_pair("RoleArn", role_arn)
        .append_pair("RoleSessionName", session_name)
        .append_pair("DurationSeconds", &session_duration.as_secs().to_string())
        .append_pair("WebIdentityToken", &token)
        .finish();
    let req = Request::post(sts_endpoint.clone())
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "text/xml")
        .body(Full::new(Bytes::from(form)))
        .map_err(|e| failure(FailureKind::Local, e.to_string()))?;
    let fetched_at = Instant::now();
    let what = format!("STS at {sts_endpoint}");
    let (status, body) = exchange(client, req, spec.timeout, &what).await?;
    let text = String::from_utf8_lossy(&body);
    if !status.is_success() {
        // STS errors carry a code and a message, never a secret.
        let code = xml_text(&text, "Code").unwrap_or_default();
        let message = xml_text(&text, "Message").unwrap_or_default();
        return Err(failure(
            FailureKind::Rejected,
            format!("STS refused AssumeRoleWithWebIdentity ({status}): {code} {message}")
                .trim_end()
                .to_string(),
        ));
    }
    let field = |tag: &str| {
        xml_text(&text, tag).ok_or_else(|| {
            failure(
                FailureKind::InvalidResponse,
                format!("the STS answer has no <{tag}>"),
            )
        })
    };
    let (expires_at, lifetime) = expiry(&field("Expiration")?)?;
    Ok(Session {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: SecretString::from(field("SecretAccessKey")?),
        session_token: SecretString::from(field("SessionToken")?),
        assumed_role: xml_text(&text, "Arn").unwrap_or_else(|| role_arn.clone()),
        expires_at,
        lifetime,
        fetched_at,
    })
}

/// The container credentials endpoint (EKS Pod Identity, ECS): a GET with the
/// authorization token; JSON `{AccessKeyId, SecretAccessKey, Token, Expiration, RoleArn?}`.
async fn container_credentials(
    uri: &Uri,
    token_file: Option<&PathBuf>,
    timeout: Duration,
    client: &StsClient,
) -> Result<Session, Failure> {
    let mut req = Request::get(uri.clone()).header(http::header::ACCEPT, "application/json");
    if let Some(f) = token_file {
        let token = read_token(f, "container authorization token", timeout).await?;
        let mut token = HeaderValue::from_str(&token).map_err(|_| {
            failure(
                FailureKind::Local,
                "the container authorization token is not a valid header value",
            )
        })?;
        token.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, token);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| failure(FailureKind::Local, e.to_string()))?;
    let fetched_at = Instant::now();
    let what = format!("the container credentials endpoint {uri}");
    let (status, body) = exchange(client, req, timeout, &what).await?;
    if !status.is_success() {
        return Err(failure(
            FailureKind::Rejected,
            format!("{what} answered {status}"),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        failure(
            FailureKind::InvalidResponse,
            format!("{what} answered something that is not JSON: {e}"),
        )
    })?;
    let field = |k: &str| {
        v[k].as_str().map(str::to_string).ok_or_else(|| {
            failure(
                FailureKind::InvalidResponse,
                format!("{what} answered without `{k}`"),
            )
        })
    };
    let (expires_at, lifetime) = expiry(&field("Expiration")?)?;
    let access_key_id = field("AccessKeyId")?;
    Ok(Session {
        assumed_role: v["RoleArn"].as_str().map_or_else(
            || format!("container-credentials:{access_key_id}"),
            str::to_string,
        ),
        access_key_id,
        secret_access_key: SecretString::from(field("SecretAccessKey")?),
        session_token: SecretString::from(field("Token")?),
        expires_at,
        lifetime,
        fetched_at,
    })
}

/// The text of the first `<tag>...</tag>` in `xml`, with the five predefined entities
/// unescaped. Enough for STS answers, whose fields are flat text.
pub(crate) fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(
        xml[start..end]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// The signing name and region an AWS host names: `{service}.{region}.amazonaws.com` (and
/// `.amazonaws.com.cn`), with the endpoint prefixes whose signing name differs
/// (`bedrock-runtime` signs as `bedrock`), and the global endpoints in us-east-1.
pub(crate) fn scope_of(host: &str) -> Option<(String, String)> {
    let host = host.trim_end_matches('.');
    let rest = host
        .strip_suffix(".amazonaws.com")
        .or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
    // Interface VPC endpoints: vpce-ID.SERVICE.REGION.vpce.amazonaws.com.
    let rest = rest.strip_suffix(".vpce").unwrap_or(rest);
    let labels: Vec<&str> = rest.split('.').collect();
    let signing_name = |endpoint: &str| -> String {
        let endpoint = endpoint.trim_end_matches("-fips");
        match endpoint {
            "bedrock-runtime" | "bedrock-agent" | "bedrock-agent-runtime" => "bedrock",
            "runtime.sagemaker" | "runtime-sagemaker" | "api.sagemaker" => "sagemaker",
            "execute-api" => "execute-api",
            other => other,
        }
        .to_string()
    };
    match labels.as_slice() {
        // Global endpoints.
        [svc @ ("sts" | "iam" | "s3" | "route53" | "cloudfront")] => {
            Some((signing_name(svc), "us-east-1".to_string()))
        }
        // Virtual-hosted S3: bucket.s3.region
        [.., "s3", region] if region.contains('-') => Some(("s3".into(), region.to_string())),
        // runtime.sagemaker.us-east-1: a two-label endpoint prefix.
        [.., a @ ("runtime" | "api"), "sagemaker", region] if region.contains('-') => {
            Some((signing_name(&format!("{a}.sagemaker")), region.to_string()))
        }
        // service.region, or a resource in front of it: id.execute-api.region
        [.., svc, region] if region.contains('-') => Some((signing_name(svc), region.to_string())),
        _ => None,
    }
}

/// The service and region an app's own SigV4 `Authorization` was signed for
/// (`Credential=AKID/DATE/REGION/SERVICE/aws4_request`): not secret, and what an `aws` route
/// re-signs for when neither its `sign:` nor the host says (a custom endpoint, a proxy name).
pub(crate) fn signed_for(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("AWS4-HMAC-SHA256 ")?;
    let cred = rest
        .split(',')
        .find_map(|p| p.trim().strip_prefix("Credential="))?;
    let mut parts = cred.split('/');
    let (_key, _date) = (parts.next()?, parts.next()?);
    let (region, service, term) = (parts.next()?, parts.next()?, parts.next()?);
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (term == "aws4_request" && label(region) && label(service))
        .then(|| (service.to_string(), region.to_string()))
}

/// The headers an app signs its own requests with: they go before ours are set.
pub(crate) const APP_SIGNATURE_HEADERS: [&str; 4] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// What a signature says of the body.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// The whole body, read first: its SHA-256 is signed.
    Bytes(&'a [u8]),
    /// `UNSIGNED-PAYLOAD`: S3 over HTTPS (TLS protects the body), which then streams.
    Unsigned,
    /// `STREAMING-UNSIGNED-PAYLOAD-TRAILER`: S3's `aws-chunked` upload with a checksum
    /// trailer, framed by the app (the AWS SDKs' default PutObject over HTTPS); the body
    /// streams as it was framed.
    UnsignedTrailer,
}

/// `x-amz-content-sha256` values that announce signed chunks (`STREAMING-AWS4-HMAC-SHA256-
/// PAYLOAD`, `-TRAILER`, the ECDSA ones): each chunk carries a signature chained from the
/// app's, which cannot be re-signed without re-framing the body.
const SIGNED_CHUNKS: &str = "STREAMING-AWS4-";

/// How an S3 request's body is signed without reading it first, from the scheme it goes
/// upstream with and what the app announced: `Ok(None)` when the body is read and hashed
/// (every service but S3, and S3 over plain HTTP).
pub(crate) fn streamed_payload(
    service: &str,
    scheme: &str,
    announced: Option<&HeaderValue>,
) -> Result<Option<Payload<'static>>, String> {
    if service != "s3" {
        return Ok(None);
    }
    match announced.and_then(|v| v.to_str().ok()) {
        Some("STREAMING-UNSIGNED-PAYLOAD-TRAILER") => Ok(Some(Payload::UnsignedTrailer)),
        Some(v) if v.starts_with(SIGNED_CHUNKS) => Err(format!(
            "an S3 upload in signed chunks ({v}) cannot be re-signed; send it over HTTPS, where the AWS SDKs sign headers only"
        )),
        _ if scheme == "https" => Ok(Some(Payload::Unsigned)),
        _ => Ok(None),
    }
}

/// What a signature covers, besides the headers.
#[derive(Debug, Clone, Copy)]
pub struct ToSign<'a> {
    /// SigV4 signing name.
    pub service: &'a str,
    /// Region.
    pub region: &'a str,
    /// Method.
    pub method: &'a str,
    /// The whole URL as it goes upstream.
    pub url: &'a str,
    /// Its authority, sent as `Host`/`:authority`.
    pub authority: &'a str,
    /// The body, or how it streams.
    pub body: Payload<'a>,
    /// The signing time.
    pub time: SystemTime,
}

/// Sign a request with `session` for `service` in `region`, setting the signature headers
/// in `headers` (`authorization`, `x-amz-date`, `x-amz-security-token`, and for S3
/// `x-amz-content-sha256`). Signed: `host` (the URL's authority, which the client sends as
/// `Host` or `:authority`), `content-type` and every `x-amz-*` header the request carries.
pub fn sign(session: &Session, req: &ToSign<'_>, headers: &mut HeaderMap) -> Result<(), String> {
    let ToSign {
        service,
        region,
        method,
        url,
        authority,
        body,
        time,
    } = *req;
    use aws_sigv4::http_request::{
        PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode, sign as sigv4,
    };
    for h in APP_SIGNATURE_HEADERS {
        headers.remove(h);
    }
    let creds = aws_credential_types::Credentials::new(
        session.access_key_id.clone(),
        session.secret_access_key.expose_secret().to_string(),
        Some(session.session_token.expose_secret().to_string()),
        None,
        "chaperone",
    );
    let identity: aws_smithy_runtime_api::client::identity::Identity = creds.into();
    let mut settings = SigningSettings::default();
    if service == "s3" {
        // S3 signs the path as sent, and wants the payload hash as a header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let mut signed: Vec<(&str, &str)> = vec![("host", authority)];
    for (name, value) in headers.iter() {
        let n = name.as_str();
        if (n == "content-type" || n.starts_with("x-amz-"))
            && let Ok(v) = value.to_str()
        {
            signed.push((n, v));
        }
    }
    let body = match body {
        // The payload hash, with the process's crypto library (hardware SHA-256 where the
        // CPU has it) rather than inside aws-sigv4.
        Payload::Bytes(b) => SignableBody::Precomputed(crate::fingerprint::sha256_hex(b)),
        Payload::Unsigned => SignableBody::UnsignedPayload,
        Payload::UnsignedTrailer => SignableBody::StreamingUnsignedPayloadTrailer,
    };
    let signable = SignableRequest::new(method, url, signed.into_iter(), body)
        .map_err(|e| format!("cannot sign this request: {e}"))?;
    let (instructions, _) = sigv4(signable, &params)
        .map_err(|e| format!("signing failed: {e}"))?
        .into_parts();
    for (name, value) in instructions.headers() {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let mut value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_file_that_would_block_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("token");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let t = std::time::Instant::now();
        let e = read_token(&fifo, "web identity token", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.message.contains("not a regular file"), "{}", e.message);
        assert!(t.elapsed() < Duration::from_secs(1));
        std::fs::write(dir.path().join("ok"), "tok\n").unwrap();
        let ok = read_token(&dir.path().join("ok"), "token", Duration::from_secs(5)).await;
        assert_eq!(ok.unwrap(), "tok");
    }

    #[test]
    fn the_scope_an_app_signed_for() {
        let mut h = HeaderMap::new();
        let with = |h: &mut HeaderMap, v: &str| {
            h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        };
        with(
            &mut h,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261201/eu-west-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc",
        );
        assert_eq!(
            signed_for(&h),
            Some(("bedrock".to_string(), "eu-west-1".to_string()))
        );
        with(
            &mut h,
            "AWS4-HMAC-SHA256 Credential=AKID/20261201/eu west/x/aws4_request",
        );
        assert_eq!(signed_for(&h), None, "not a region");
        with(&mut h, "Bearer abc");
        assert_eq!(signed_for(&h), None);
    }

    #[test]
    fn service_and_region_from_aws_hosts() {
        let s = |h: &str| scope_of(h).map(|(a, b)| format!("{a}/{b}"));
        assert_eq!(
            s("bedrock-runtime.us-east-1.amazonaws.com").as_deref(),
            Some("bedrock/us-east-1")
        );
        assert_eq!(
            s("bedrock-runtime-fips.us-west-2.amazonaws.com").as_deref(),
            Some("bedrock/us-west-2")
        );
        assert_eq!(
            s("vpce-0a1b2c3d-4e5f6a7b.bedrock-runtime.eu-central-1.vpce.amazonaws.com").as_deref(),
            Some("bedrock/eu-central-1")
        );
        assert_eq!(
            s("secretsmanager.eu-west-1.amazonaws.com").as_deref(),
            Some("secretsmanager/eu-west-1")
        );
        assert_eq!(s("sts.amazonaws.com").as_deref(), Some("sts/us-east-1"));
        assert_eq!(
            s("runtime.sagemaker.us-east-1.amazonaws.com").as_deref(),
            Some("sagemaker/us-east-1")
        );
        assert_eq!(
            s("my-bucket.s3.us-east-2.amazonaws.com").as_deref(),
            Some("s3/us-east-2")
        );
        assert_eq!(
            s("abc123.execute-api.ap-south-1.amazonaws.com").as_deref(),
            Some("execute-api/ap-south-1")
        );
        assert_eq!(s("api.openai.com"), None);
        assert_eq!(s("127.0.0.1"), None);
    }

    #[test]
    fn xml_fields_are_read_and_unescaped() {
        let xml = "<AssumeRoleWithWebIdentityResponse><Result><Credentials>\
            <AccessKeyId>ASIAEXAMPLE</AccessKeyId><SessionToken>a+b/c==&amp;x</SessionToken>\
            </Credentials></Result></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(xml_text(xml, "AccessKeyId").as_deref(), Some("ASIAEXAMPLE"));
        assert_eq!(xml_text(xml, "SessionToken").as_deref(), Some("a+b/c==&x"));
        assert_eq!(xml_text(xml, "Missing"), None);
    }

    /// The AWS SigV4 test suite's `get-vanilla` case (credentials AKIDEXAMPLE, 2015-08-30
    /// 12:36:00 UTC, service `service`, us-east-1), with a session token: the signature
    /// covers host and x-amz-date, and the token is sent and signed.
    #[test]
    fn signs_as_the_sigv4_suite_says_and_replaces_the_apps_signature() {
        let session = Session {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SecretString::from("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            session_token: SecretString::from("session-token-example"),
            assumed_role: "arn:aws:sts::123456789012:assumed-role/r/s".into(),
            expires_at: 0,
            lifetime: None,
            fetched_at: Instant::now(),
        };
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("AWS4-HMAC-SHA256 Credential=AKIAAPPKEY/x, Signature=00"),
        );
        h.insert("x-amz-date", HeaderValue::from_static("19990101T000000Z"));
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
        let req = ToSign {
            service: "service",
            region: "us-east-1",
            method: "GET",
            url: "https://example.amazonaws.com/",
            authority: "example.amazonaws.com",
            body: Payload::Bytes(b""),
            time,
        };
        sign(&session, &req, &mut h).unwrap();
        assert_eq!(h["x-amz-date"], "20150830T123600Z");
        assert_eq!(h["x-amz-security-token"], "session-token-example");
        let auth = h["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature="
            ),
            "{auth}"
        );
        assert!(!auth.contains("AKIAAPPKEY"));
        assert!(h["authorization"].is_sensitive());
    }
}

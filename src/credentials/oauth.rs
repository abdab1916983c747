//! OAuth 2.0 client credentials (RFC 6749 §4.4): fetch a token from the authorization server,
//! cache it until shortly before it expires, one fetch for concurrent misses, fail closed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::CredentialError;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// Settings of one `client_credentials` credential.
#[derive(Debug, Clone)]
pub struct OAuthSpec {
    /// Credential name.
    pub name: String,
    /// Token endpoint.
    pub token_url: Uri,
    /// Client id.
    pub client_id: String,
    /// File holding the client secret; read on every fetch, so rotation needs no restart.
    pub client_secret_file: PathBuf,
    /// Client authentication method.
    pub auth: ClientAuth,
    /// Bound on one fetch, connect to response.
    pub timeout: Duration,
}

/// A token and what may be logged about it.
#[derive(Debug)]
pub struct Token {
    /// The access token.
    pub value: SecretString,
    /// Its `jti` when it is a JWT, else a fingerprint (set by the caller).
    pub jti: Option<String>,
    /// Expiry (Unix seconds).
    pub expires_at: u64,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Until when the cache may hand it out (before `exp`, with skew).
    pub cache_until: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// HTTP client for token endpoints (HTTPS verified against the configured roots).
pub type TokenClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Build the token-endpoint client.
pub fn token_client(tls: Arc<rustls::ClientConfig>) -> TokenClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// How long before `exp` a token stops being handed out: 10% of its lifetime, at least 10 s.
pub fn skew(lifetime: Duration) -> Duration {
    (lifetime / 10).max(Duration::from_secs(10))
}

/// Fetch one token. Nothing secret reaches the error text.
pub async fn fetch(
    client: &TokenClient,
    spec: &OAuthSpec,
    resource: Option<&str>,
    scopes: &[String],
) -> Result<Token, CredentialError> {
    let unavailable =
        |m: String| CredentialError::Unavailable(format!("credential `{}`: {m}", spec.name));
    let secret = std::fs::read_to_string(&spec.client_secret_file)
        .map_err(|e| unavailable(format!("cannot read the client secret file: {e}")))?;
    let secret = SecretString::from(secret.trim_end_matches(['\n', '\r']).to_string());

    // Built in a block: the serializer is not Send and must not live across an await.
    let body = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if !scopes.is_empty() {
            form.append_pair("scope", &scopes.join(" "));
        }
        if let Some(r) = resource {
            form.append_pair("resource", r);
        }
        if spec.auth == ClientAuth::Post {
            form.append_pair("client_id", &spec.client_id);
            form.append_pair("client_secret", secret.expose_secret());
        }
        form.finish()
    };
    let mut req = Request::post(spec.token_url.clone())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json");
    match spec.auth {
        ClientAuth::Basic => {
            // RFC 6749 §2.3.1: both parts form-urlencoded before Base64.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", enc(&spec.client_id), enc(secret.expose_secret()));
            let mut v = http::HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ))
            .map_err(|_| unavailable("client credentials are not a valid header value".into()))?;
            v.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, v);
        }
        // In the form body, above.
        ClientAuth::Post => {}
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| unavailable(e.to_string()))?;
    let started = Instant::now();
    let resp = tokio::time::timeout(spec.timeout, async {
        let resp = client.request(req).await.map_err(|e| {
            unavailable(format!(
                "token endpoint unreachable: {}",
                crate::error::innermost(&e)
            ))
        })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        Ok::<_, CredentialError>((status, body))
    })
    .await
    .map_err(|_| {
        unavailable(format!(
            "token endpoint did not answer within {:?}",
            spec.timeout
        ))
    })??;
    let (status, body) = resp;
    if status != StatusCode::OK {
        let why = serde_json::from_slice::<ErrorResponse>(&body)
            .map(|e| {
                format!(
                    "{}{}",
                    e.error,
                    e.error_description
                        .map(|d| format!(" ({d})"))
                        .unwrap_or_default()
                )
            })
            .unwrap_or_else(|_| "no OAuth error body".into());
        return Err(unavailable(format!(
            "token endpoint answered {status}: {why}"
        )));
    }
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| unavailable(format!("token response is not valid JSON: {e}")))?;
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let jti = jwt_claim(&parsed.access_token, "jti");
    let cache_until = (started + lifetime)
        .checked_sub(skew(lifetime))
        .unwrap_or(started);
    Ok(Token {
        value: SecretString::from(parsed.access_token),
        jti,
        expires_at: now + lifetime.as_secs(),
        scopes: parsed
            .scope
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_else(|| scopes.to_vec()),
        cache_until,
    })
}

/// A string claim of a JWT's payload, read without verification (for logging only).
fn jwt_claim(token: &str, claim: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get(claim)?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_ten_percent_at_least_ten_seconds() {
        assert_eq!(skew(Duration::from_secs(3600)), Duration::from_secs(360));
        assert_eq!(skew(Duration::from_secs(60)), Duration::from_secs(10));
    }

    #[test]
    fn reads_jti_of_a_jwt_only() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"jti":"abc"}"#);
        assert_eq!(
            jwt_claim(&format!("eyJhbGciOiJub25lIn0.{payload}.sig"), "jti").as_deref(),
            Some("abc")
        );
        assert_eq!(jwt_claim("opaque-token", "jti"), None);
    }
}

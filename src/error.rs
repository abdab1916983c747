//! What the app sees when the proxy refuses or fails a request (DESIGN §8): a JSON body with
//! `error`, `reason` and `request_id`, and the `chaperone-request-id` header.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use serde::Serialize;

/// Request id header: taken from the app if valid, else generated; on every response.
pub(crate) static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("chaperone-request-id");

/// On a response Chaperone made itself (a refusal or a failure), its error code: so the app,
/// and whatever logs its HTTP errors, can tell a proxy's 502 from an upstream's.
pub(crate) static ERROR_HEADER: HeaderName = HeaderName::from_static("chaperone-error");

/// Boxed error for bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body type of every response the proxy sends and every request it forwards.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body from bytes.
pub(crate) fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The innermost cause of an error chain (the OS or TLS error a user can act on).
pub(crate) fn innermost<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause
}

/// The error codes of DESIGN §8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// 403: policy or a guardrail refused the request.
    PolicyDenied,
    /// 403: an embedded secret was found in block mode.
    EmbeddedSecret,
    /// 503: the route's credential could not be obtained.
    CredentialUnavailable,
    /// 502: the upstream could not be reached or answered badly.
    UpstreamUnreachable,
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
    /// 400: the request was malformed.
    BadRequest,
    /// 508: the request has already passed through this proxy.
    LoopDetected,
    /// 413: the body is larger than the proxy can take for this route (a signed request's
    /// body must be read whole).
    BodyTooLarge,
    /// 401: the route acts on behalf of a user and the request carries no user token.
    UserTokenRequired,
    /// 401: the user token did not verify.
    UserTokenInvalid,
    /// 503: too many connections are open (to the listener, or to the upstream).
    TooManyConnections,
}

impl ErrorCode {
    /// The `error` string.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::EmbeddedSecret => "embedded_secret",
            ErrorCode::CredentialUnavailable => "credential_unavailable",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::LoopDetected => "loop_detected",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UserTokenRequired => "user_token_required",
            ErrorCode::UserTokenInvalid => "user_token_invalid",
            ErrorCode::TooManyConnections => "too_many_connections",
        }
    }

    /// The status code.
    pub(crate) fn status(self) -> StatusCode {
        match self {
            ErrorCode::PolicyDenied | ErrorCode::EmbeddedSecret => StatusCode::FORBIDDEN,
            ErrorCode::CredentialUnavailable | ErrorCode::TooManyConnections => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::LoopDetected => StatusCode::LOOP_DETECTED,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UserTokenRequired | ErrorCode::UserTokenInvalid => StatusCode::UNAUTHORIZED,
        }
    }

    /// Whether the request was refused (deny) rather than failed after being allowed.
    pub(crate) fn is_denial(self) -> bool {
        matches!(
            self,
            ErrorCode::PolicyDenied
                | ErrorCode::EmbeddedSecret
                | ErrorCode::BadRequest
                | ErrorCode::LoopDetected
                | ErrorCode::UserTokenRequired
                | ErrorCode::UserTokenInvalid
        )
    }
}

/// A refusal or failure, before any upstream response exists.
#[derive(Debug, Clone)]
pub(crate) struct Rejection {
    /// Which error.
    pub(crate) code: ErrorCode,
    /// Why, in words; must never contain a secret.
    pub(crate) reason: String,
    /// Deciding policies, for policy denials.
    pub(crate) policy_ids: Vec<String>,
    /// The JSON-RPC id of the MCP request refused: the answer is then the JSON-RPC error an
    /// MCP client expects (HTTP 200), not Chaperone's own body.
    pub(crate) jsonrpc_id: Option<Box<serde_json::Value>>,
    /// Close the client connection after the answer (`Connection: close`): what is left of
    /// the request on it cannot be trusted to be where the next request starts.
    pub(crate) close: bool,
}

impl Rejection {
    /// A rejection with a reason.
    pub(crate) fn new(code: ErrorCode, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
            policy_ids: Vec::new(),
            jsonrpc_id: None,
            close: false,
        }
    }

    /// The response the app gets.
    pub(crate) fn to_response(&self, request_id: &str) -> Response<ProxyBody> {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            reason: &'a str,
            request_id: &'a str,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            policy_ids: &'a [String],
        }
        let (body, status) = match &self.jsonrpc_id {
            Some(id) => (
                jsonrpc_refusal(
                    id,
                    &self.reason,
                    self.code.as_str(),
                    &self.policy_ids,
                    request_id,
                ),
                StatusCode::OK,
            ),
            None => (
                serde_json::to_vec(&Body {
                    error: self.code.as_str(),
                    reason: &self.reason,
                    request_id,
                    policy_ids: &self.policy_ids,
                })
                .unwrap_or_default(),
                self.code.status(),
            ),
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            ERROR_HEADER.clone(),
            HeaderValue::from_static(self.code.as_str()),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert(REQUEST_ID_HEADER.clone(), v);
        }
        if self.close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The JSON-RPC error an MCP client gets for a refused call: its own id, the reason, and
/// what Chaperone's own error body would have said (`error`, `policy_ids`, `request_id`).
fn jsonrpc_refusal(
    id: &serde_json::Value,
    reason: &str,
    error: &str,
    policy_ids: &[String],
    request_id: &str,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            // JSON-RPC's range for implementation-defined server errors.
            "code": -32001,
            "message": reason,
            "data": { "error": error, "policy_ids": policy_ids, "request_id": request_id },
        },
    }))
    .unwrap_or_default()
}

//! Stage 2, identify: who is calling (from the listener's identity), why (the
//! `chaperone-purpose` header), and which request this is (request id, trace id).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::REQUEST_ID_HEADER;

/// Identity of one listener: who the sidecar speaks for on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// SPIFFE ID or service account.
    pub id: String,
    /// Workload name.
    pub workload: String,
    /// Stage served by the listener.
    pub stage: String,
    /// Deployment environment.
    pub environment: String,
}

/// Request header naming the call's purpose; removed before forwarding.
pub(crate) static PURPOSE_HEADER: HeaderName = HeaderName::from_static("chaperone-purpose");
/// W3C trace context.
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Purpose used when neither the request nor its route names one, so policy can always read it.
pub(crate) const UNSPECIFIED_PURPOSE: &str = "unspecified";

/// Who is calling, and why.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The identity the listener serves.
    pub(crate) identity: Arc<Identity>,
    /// Purpose from the request header, if it named one.
    pub(crate) purpose: Option<String>,
    /// Request id (from the app or generated).
    pub(crate) request_id: String,
    /// Trace id from `traceparent`, if present and well formed.
    pub(crate) trace_id: Option<String>,
    /// The client's address.
    pub(crate) client: SocketAddr,
}

/// Who a connection comes from, and whether the listener admits it: the proxy attests it
/// from the kernel ([`crate::proxy::attest`]), identify refuses a caller the listener does not
/// admit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attestation {
    /// The listener admits any local process; the UID was not looked up.
    Unchecked,
    /// The kernel says the client socket belongs to this UID, which the listener admits.
    Admitted(u32),
    /// Refused, and why (for the 403 body and the log).
    Refused(String),
}

impl Attestation {
    /// The attested UID, if one was looked up and admitted.
    pub(crate) fn uid(&self) -> Option<u32> {
        match self {
            Attestation::Admitted(u) => Some(*u),
            _ => None,
        }
    }
}

/// One client connection, as accepted: the identity its listener serves, the client's
/// address, and what the kernel attests about the client.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The identity the listener serves.
    pub(crate) identity: Arc<Identity>,
    /// The client's address (loopback for a Unix-socket client).
    pub(crate) client: SocketAddr,
    /// The client as logged: its address, or `unix:pid=N`.
    pub(crate) label: String,
    /// Whether the listener admits this client (see [`crate::proxy::attest`]).
    pub(crate) attestation: Attestation,
}

/// Check a purpose: 1 to 64 characters from `A-Za-z0-9._:/-`.
pub(crate) fn validate_purpose(p: &str) -> Result<(), String> {
    let ok_len = (1..=64).contains(&p.len());
    let ok_chars = p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err("a purpose is 1 to 64 characters from A-Z a-z 0-9 . _ : / -".into())
    }
}

/// Identify the caller and take the purpose header off the request.
///
/// Fails only on a malformed purpose header, which the pipeline answers with 400.
pub(crate) fn identify(
    identity: &Arc<Identity>,
    headers: &mut HeaderMap,
    client: SocketAddr,
) -> (Caller, Result<(), String>) {
    let request_id = headers
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // The app may send a bad id; the upstream sees the same id we log.
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID_HEADER.clone(), v);
    }
    let trace_id = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);

    let mut verdict = Ok(());
    let mut purpose = None;
    // Every purpose header is removed, even repeated ones: none may reach the upstream.
    let values: Vec<HeaderValue> = headers.get_all(&PURPOSE_HEADER).iter().cloned().collect();
    headers.remove(&PURPOSE_HEADER);
    if values.len() > 1 {
        verdict = Err("more than one chaperone-purpose header".to_string());
    } else if let Some(v) = values.first() {
        match v.to_str().map_err(|_| String::new()).and_then(|s| {
            let s = s.trim();
            validate_purpose(s).map(|_| s.to_string())
        }) {
            // A purpose is written in the line, the JWT and policy: one shaped like a
            // credential (an app that put its key in the wrong header) is refused, and
            // neither it nor its text goes anywhere.
            Ok(p) if crate::strip::holds_credential(&p) => {
                verdict = Err("the chaperone-purpose header holds something shaped like a credential; a purpose names what the call is for".to_string());
            }
            Ok(p) => purpose = Some(p),
            Err(_) => verdict = Err("malformed chaperone-purpose header: a purpose is 1 to 64 characters from A-Z a-z 0-9 . _ : / -".to_string()),
        }
    }
    (
        Caller {
            identity: identity.clone(),
            purpose,
            request_id,
            trace_id,
            client,
        },
        verdict,
    )
}

/// An app's request id is kept (and sent on, and logged) when it is short printable text
/// and not shaped like a credential; otherwise the request gets an id of its own.
fn valid_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes().all(|b| b.is_ascii_graphic())
        && !crate::strip::holds_credential(v)
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if well formed.
fn parse_traceparent(v: &str) -> Option<String> {
    let mut parts = v.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && hex(flags, 2);
    valid.then(|| trace.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> Arc<Identity> {
        Arc::new(Identity {
            id: "spiffe://t/x".into(),
            workload: "w".into(),
            stage: "main".into(),
            environment: "test".into(),
        })
    }

    #[test]
    fn purpose_is_read_and_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "chaperone-purpose",
            HeaderValue::from_static("answer-question"),
        );
        let (c, ok) = identify(&ident(), &mut h, "127.0.0.1:1".parse().unwrap());
        assert!(ok.is_ok());
        assert_eq!(c.purpose.as_deref(), Some("answer-question"));
        assert!(h.get("chaperone-purpose").is_none());
        assert_eq!(
            h.get("chaperone-request-id").unwrap(),
            c.request_id.as_str()
        );
    }

    #[test]
    fn bad_purpose_is_rejected_and_still_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "chaperone-purpose",
            HeaderValue::from_static("has spaces in it"),
        );
        let (_, ok) = identify(&ident(), &mut h, "127.0.0.1:1".parse().unwrap());
        assert!(ok.is_err());
        assert!(h.get("chaperone-purpose").is_none());
    }

    #[test]
    fn traceparent() {
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(t).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }

    #[test]
    fn token_shaped_purposes_and_request_ids_go_nowhere() {
        let key = format!("sk-proj-{}", "Zx9_".repeat(12));
        let mut h = HeaderMap::new();
        h.insert(&REQUEST_ID_HEADER, HeaderValue::from_str(&key).unwrap());
        h.insert(&PURPOSE_HEADER, HeaderValue::from_str(&key).unwrap());
        let (c, verdict) = identify(&ident(), &mut h, "127.0.0.1:1".parse().unwrap());
        let why = verdict.unwrap_err();
        assert!(
            why.contains("shaped like a credential") && !why.contains(&key),
            "{why}"
        );
        assert_eq!(c.purpose, None);
        assert_ne!(c.request_id, key);
        assert_eq!(h.get(&REQUEST_ID_HEADER).unwrap(), c.request_id.as_str());
        assert!(h.get(&PURPOSE_HEADER).is_none());
    }

    #[test]
    fn app_request_id_is_kept_when_valid() {
        let mut h = HeaderMap::new();
        h.insert("chaperone-request-id", HeaderValue::from_static("req-123"));
        let (c, _) = identify(&ident(), &mut h, "127.0.0.1:1".parse().unwrap());
        assert_eq!(c.request_id, "req-123");
    }
}

//! The credential stage's one call: obtain the route's credential for this request and put it
//! where the route says, a header or a field of the buffered body. Fail closed: no credential,
//! no forwarding.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret;

use super::{Credentials, Issued, MintRequest};
use crate::error::{ErrorCode, Rejection};
use crate::identify::Caller;
use crate::metrics::CredentialLabels;
use crate::route::{InjectInto, Route};
use crate::strip::BodyPlan;
use crate::target::Target;

/// The request a credential is obtained for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Call<'a> {
    /// Who calls.
    pub(crate) caller: &'a Caller,
    /// Where to.
    pub(crate) target: &'a Target,
    /// The request method.
    pub(crate) method: &'a str,
    /// The purpose it serves (after the route's default).
    pub(crate) purpose: &'a str,
    /// The query the request goes upstream with (after the strip stage), if any.
    pub(crate) query: Option<&'a str>,
    /// The service and region the app's own SigV4 signature named, if it sent one.
    pub(crate) signed_for: Option<&'a (String, String)>,
    /// The user the call acts for, when its route exchanges a user's token.
    pub(crate) user: Option<&'a super::Delegation>,
    /// On an MCP route, the tools the request calls (their scopes replace the route's).
    pub(crate) tools: &'a [&'a str],
    /// The RFC 8707 resource an MCP server named for itself (its protected-resource
    /// metadata), when the route names none.
    pub(crate) resource: Option<&'a str>,
    /// Scopes the MCP server asked for, used when the route names none.
    pub(crate) asked_scopes: &'a [String],
}

impl Credentials {
    /// Obtain `route`'s credential for `call` and inject it into `headers` or into `body` (the
    /// buffered request body, when there is one). `Ok(None)` when the route injects nothing;
    /// the returned [`Issued`] is what the log line says of it.
    pub(crate) async fn inject(
        &self,
        route: &Route,
        call: Call<'_>,
        headers: &mut HeaderMap,
        body: Option<&mut Bytes>,
    ) -> Result<Option<Issued>, Rejection> {
        // The vendor's required version headers, unless the app pinned its own; before any
        // signature, which covers them.
        for (name, value) in &route.add_headers {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        let Some(name) = &route.credential else {
            return Ok(None);
        };
        if let Some(super::Provider::Aws(source)) = self.providers.get(name) {
            return self
                .sign(source, name, route, call, headers, body.map(|b| &b[..]))
                .await
                .map(Some);
        }
        let identity = &call.caller.identity;
        let audience = route
            .audience
            .clone()
            .unwrap_or_else(|| call.target.origin());
        let scopes = match route.scopes_for(call.purpose, call.tools) {
            s if s.is_empty() => std::borrow::Cow::Borrowed(call.asked_scopes),
            s => s,
        };
        let obtained = self
            .obtain(
                name,
                &MintRequest {
                    subject: &identity.id,
                    audience: &audience,
                    requested_audience: route.audience.as_deref(),
                    resource: route.resource.as_deref().or(call.resource),
                    max_ttl: route.max_ttl,
                    txn: &call.caller.request_id,
                    scopes: &scopes,
                    workload: &identity.workload,
                    stage: &identity.stage,
                    environment: &identity.environment,
                    purpose: call.purpose,
                    method: call.method,
                    host: &call.target.host,
                    path: &call.target.path,
                    user: call.user,
                },
            )
            .await;
        let count = |kind, result| self.count_issued(name, kind, result);
        let issued = match obtained {
            Ok(i) => i,
            Err(e) => {
                count("unknown", "error");
                return Err(Rejection::new(
                    ErrorCode::CredentialUnavailable,
                    format!("credential `{name}`: {e}"),
                ));
            }
        };
        count(issued.kind, "ok");
        let inj = &route.inject;
        let value = format!(
            "{}{}{}",
            inj.prefix,
            issued.value.expose_secret(),
            inj.suffix
        );
        match &inj.into {
            InjectInto::Header(header) => {
                let mut hv = HeaderValue::from_str(&value).map_err(|_| {
                    Rejection::new(
                        ErrorCode::CredentialUnavailable,
                        format!("credential `{name}` is not a valid header value"),
                    )
                })?;
                hv.set_sensitive(true);
                headers.insert(header.clone(), hv);
                // DPoP: a fresh proof of possession for this very request.
                if let Some(k) = self.dpop_of(name) {
                    let t = call.target;
                    let htu = super::dpop::htu(t.scheme, &t.authority(), t.wire_path());
                    let proof = k
                        .proof(call.method, &htu, Some(issued.value.expose_secret()))
                        .ok()
                        .and_then(|p| HeaderValue::from_str(&p).ok())
                        .ok_or_else(|| {
                            Rejection::new(
                                ErrorCode::CredentialUnavailable,
                                format!("credential `{name}`: cannot make a DPoP proof"),
                            )
                        })?;
                    headers.insert("dpop", proof);
                }
            }
            InjectInto::BodyField(field) => {
                into_body(headers, body, field, &value).map_err(|why| {
                    Rejection::new(
                        ErrorCode::BadRequest,
                        format!(
                            "route `{}` puts its credential into the body field `{field}`: {why}",
                            route.name
                        ),
                    )
                })?;
            }
        }
        Ok(Some(issued))
    }
}

impl Credentials {
    /// Count one credential handed out (or not) for a call.
    fn count_issued(&self, name: &str, kind: &'static str, result: &'static str) {
        self.metrics
            .credentials_issued
            .get_or_create(&CredentialLabels {
                credential: name.to_string(),
                kind,
                result,
            })
            .inc();
    }

    /// An `aws` route: sign the request with the current session (fail closed: no session,
    /// no forwarding). The app's own signature headers are replaced.
    async fn sign(
        &self,
        source: &super::aws::AwsSource,
        name: &str,
        route: &Route,
        call: Call<'_>,
        headers: &mut HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<Issued, Rejection> {
        let unavailable = |why: String| {
            Rejection::new(
                ErrorCode::CredentialUnavailable,
                format!("credential `{name}`: {why}"),
            )
        };
        let count = |result| self.count_issued(name, "aws", result);
        let session = source.session().await.map_err(|e| {
            count("error");
            unavailable(e)
        })?;
        let target = call.target;
        let (service, region) = signing_scope(route, target, call.signed_for, &source.spec.region)
            .map_err(unavailable)?;
        let payload = match super::aws::streamed_payload(
            &service,
            target.scheme,
            headers.get("x-amz-content-sha256"),
        ) {
            Err(why) => {
                count("error");
                return Err(Rejection::new(ErrorCode::BadRequest, why));
            }
            // Framed by the app: signed as framed, whether or not it was read.
            Ok(Some(p @ super::aws::Payload::UnsignedTrailer)) => p,
            Ok(Some(p)) if body.is_none() => p,
            _ => super::aws::Payload::Bytes(body.unwrap_or_default()),
        };
        let authority = target.authority();
        let url = match call.query {
            Some(q) if !q.is_empty() => {
                format!("{}://{authority}{}?{q}", target.scheme, target.wire_path())
            }
            _ => format!("{}://{authority}{}", target.scheme, target.wire_path()),
        };
        let s = &session.token;
        let req = super::aws::ToSign {
            service: &service,
            region: &region,
            method: call.method,
            url: &url,
            authority: &authority,
            body: payload,
            time: std::time::SystemTime::now(),
        };
        super::aws::sign(s, &req, headers).map_err(|e| {
            count("error");
            unavailable(e)
        })?;
        count("ok");
        Ok(Issued {
            name: name.to_string(),
            kind: "aws",
            value: secrecy::SecretString::from(String::new()),
            id: s.assumed_role.clone(),
            expires_at: Some(s.expires_at),
            scopes: vec![format!("{service}:{region}")],
            flags: Vec::new(),
            revoke: None,
        })
    }
}

/// The SigV4 service and region a request on `route` to `target` is signed for: the route's
/// `sign:` first, then what the host names, then what the app's own signature named, then
/// (region only) the credential's region.
pub(super) fn signing_scope(
    route: &Route,
    target: &Target,
    app: Option<&(String, String)>,
    default_region: &str,
) -> Result<(String, String), String> {
    let from_host = super::aws::scope_of(&target.host);
    let own = route.sign.clone().unwrap_or_default();
    let service = own
        .service
        .or_else(|| from_host.as_ref().map(|(s, _)| s.clone()))
        .or_else(|| app.map(|(s, _)| s.clone()))
        .ok_or_else(|| {
            format!(
                "cannot tell which AWS service {} is (the host does not say, nor does a signature from the app): set `sign.service` on route `{}`",
                target.host, route.name
            )
        })?;
    let region = own
        .region
        .or_else(|| from_host.map(|(_, r)| r))
        .or_else(|| app.map(|(_, r)| r.clone()))
        .unwrap_or_else(|| default_region.to_string());
    Ok((service, region))
}

/// Put a credential into a field of a buffered JSON, form or multipart body.
fn into_body(
    headers: &HeaderMap,
    body: Option<&mut Bytes>,
    field: &str,
    value: &str,
) -> Result<(), String> {
    let (BodyPlan::Inspect(kind), Some(bytes)) = (crate::strip::body::plan(headers), body) else {
        return Err(
            "the request needs a JSON, form or multipart body (uncompressed, at most `strip.body_max_bytes`)"
                .into(),
        );
    };
    let out = crate::strip::body::inject_field(&kind, bytes, field, value)?;
    *bytes = Bytes::from(out);
    Ok(())
}

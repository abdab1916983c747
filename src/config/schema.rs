//! The configuration file as written by users (DESIGN §3).
//!
//! Every struct rejects unknown keys so a typo never silently turns a guard off. Values are
//! kept as users wrote them (strings for addresses and durations); [`super::validate`] turns
//! them into typed runtime settings and reports every problem with its file, line and key.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::strip::StripMode;

/// The root of `chaperone.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// Address of the proxy listener the app's `HTTP_PROXY` points at.
    /// Default `127.0.0.1:15001`.
    #[serde(default)]
    pub(crate) listen: Option<String>,
    /// Address of the admin server (`/healthz`, `/readyz`, `/metrics`, JWKS).
    /// Default `127.0.0.1:15000`.
    #[serde(default)]
    pub(crate) admin: Option<String>,
    /// The workload identity this sidecar serves.
    pub(crate) identity: IdentityConfig,
    /// Optional extra listeners, one per pipeline stage, each with its own identity.
    #[serde(default)]
    pub(crate) stages: Vec<StageConfig>,
    /// TLS interception (local CA) and upstream TLS.
    #[serde(default)]
    pub(crate) tls: Option<TlsConfig>,
    /// Named credential sources that routes refer to.
    #[serde(default)]
    pub(crate) credentials: BTreeMap<String, CredentialConfig>,
    /// Routes, matched in order; the first match wins.
    #[serde(default)]
    pub(crate) routes: Vec<RouteConfig>,
    /// What to do with secrets the app embedded in its requests.
    #[serde(default)]
    pub(crate) strip: StripConfig,
    /// The Cedar policy that authorizes every request.
    pub(crate) policy: Option<PolicyConfig>,
    /// Where and how the purpose log is written.
    #[serde(default)]
    pub(crate) log: LogConfig,
    /// Timeouts on both sides of the proxy.
    #[serde(default)]
    pub(crate) timeouts: TimeoutsConfig,
    /// An HTTP proxy that connections out go through (a corporate egress proxy).
    #[serde(default)]
    pub(crate) upstream_proxy: Option<UpstreamProxyConfig>,
    /// Worker threads serving proxy connections, each with its own event loop and upstream
    /// pool. Default: the number of CPUs available to the process.
    #[serde(default)]
    pub(crate) workers: Option<usize>,
    /// Client connections each proxy listener (each stage) keeps open at most; one more is
    /// answered 503 and closed. Default 1024.
    #[serde(default)]
    pub(crate) max_connections: Option<usize>,
    /// Connections each worker keeps open to one upstream (scheme, host and port) at most;
    /// a request past it waits for one, up to the connect timeout. Default 256.
    #[serde(default)]
    pub(crate) max_connections_per_upstream: Option<usize>,
}

/// Who the sidecar speaks for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IdentityConfig {
    /// The workload identity: a SPIFFE ID (`spiffe://trust-domain/path`) or a service account.
    pub(crate) id: String,
    /// The workload's name as SREs know it (e.g. `inference-api`).
    pub(crate) workload: String,
    /// Deployment environment (`prod`, `staging`, `dev`, ...).
    pub(crate) environment: String,
    /// The stage name of the main listener. Default `main`.
    #[serde(default)]
    pub(crate) stage: Option<String>,
    /// File holding the workload's subject token (for token exchange); re-read when it changes.
    #[serde(default)]
    pub(crate) subject_token_file: Option<String>,
    /// The trust domain transaction tokens are scoped to (their `aud`). Default: the trust
    /// domain of a SPIFFE `id`.
    #[serde(default)]
    pub(crate) trust_domain: Option<String>,
    /// Who may use the main listener, attested by the kernel. Absent: any local process.
    #[serde(default)]
    pub(crate) callers: Option<CallersConfig>,
}

/// The processes a listener serves, as the kernel attests them: the owning UID of the
/// client's TCP socket (read from the kernel's socket table; the client must be in the same
/// network namespace, which a pod's containers are). A connection from any other UID gets
/// 403 `policy_denied` for every request, so one container cannot use another stage's
/// identity by connecting to its port.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallersConfig {
    /// The UIDs admitted (the `runAsUser` of the stage's container).
    pub(crate) uids: Vec<u32>,
}

/// An extra listener that serves one pipeline stage under its own identity.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StageConfig {
    /// Stage name, e.g. `training`; it is handed to policy and logged.
    pub(crate) name: String,
    /// Address this stage's listener binds: `IP:port`, or `unix:/path` for a Unix socket
    /// (created mode 0666: `callers.uids`, checked with `SO_PEERCRED`, is what admits).
    pub(crate) listen: String,
    /// The identity of this stage. Default: the main identity's id.
    #[serde(default)]
    pub(crate) id: Option<String>,
    /// Who may use this stage's listener, attested by the kernel. Without it any local
    /// process can speak as this stage.
    #[serde(default)]
    pub(crate) callers: Option<CallersConfig>,
}

/// TLS settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    /// Local CA certificate (PEM) that signs intercepted connections (`chaperone ca init`).
    /// Without `ca_cert` and `ca_key`, CONNECT is never intercepted.
    #[serde(default)]
    pub(crate) ca_cert: Option<String>,
    /// The CA's private key (PEM, keep it mode 0600).
    #[serde(default)]
    pub(crate) ca_key: Option<String>,
    /// Roots that verify upstream certificates: `system` or a PEM bundle path. Default `system`.
    #[serde(default)]
    pub(crate) upstream_roots: Option<String>,
    /// Hosts never intercepted (pinned certificates, mTLS): CONNECT to them is a blind tunnel
    /// after a policy check. `*.example.org` wildcards allowed.
    #[serde(default)]
    pub(crate) passthrough: Vec<String>,
}

/// A credential source. The secret material itself never appears in the config.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
// Parsed once at start: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum CredentialConfig {
    /// A token minted locally for each call (Transaction-Token shaped JWT).
    Jwt {
        /// Token lifetime, e.g. `60s`; at most 300s. Default `60s`.
        #[serde(default)]
        ttl: Option<String>,
        /// PEM PKCS#8 private key file (Ed25519 or P-256). A changed file rotates the key; the
        /// previous public key stays in the JWKS until its tokens have expired. Absent: an
        /// Ed25519 key generated at start.
        #[serde(default)]
        signing_key: Option<String>,
        /// Replace a generated key this often (e.g. `24h`), with the same overlap. Only
        /// without `signing_key` (a key file rotates when the file changes).
        #[serde(default)]
        rotate_every: Option<String>,
        /// The `iss` claim. Default: the identity id.
        #[serde(default)]
        issuer: Option<String>,
        /// `access_token` (default): an RFC 9068 JWT access token (`typ: at+jwt`, `aud` the
        /// route's audience or the destination's origin), sent as `Authorization: Bearer`.
        /// `txn_token`: an OAuth Transaction Token (`typ: txntoken+jwt`, `aud` the trust
        /// domain), sent in the `Txn-Token` header, never as `Authorization`.
        #[serde(default)]
        profile: Option<String>,
    },
    /// OAuth 2.0 client credentials (RFC 6749 §4.4): a token fetched from an authorization
    /// server, cached until shortly before it expires.
    ClientCredentials {
        /// Token endpoint; `https`, or `http` on a loopback address only.
        token_url: String,
        /// Client id.
        client_id: String,
        /// `client_secret_basic` (default), `client_secret_post`, `private_key_jwt`
        /// (RFC 7523, signed here), `client_assertion` (RFC 7523, an assertion issued
        /// elsewhere, read from a file) or `tls_client_auth` (RFC 8705).
        #[serde(default)]
        auth_method: Option<String>,
        /// File holding the client secret (read on every fetch); for the two secret methods.
        #[serde(default)]
        client_secret_file: Option<String>,
        /// PEM private key: signs `private_key_jwt` assertions (Ed25519, P-256 or RSA), or is
        /// the key of the `tls_client_auth` certificate. Read on every fetch.
        #[serde(default)]
        client_key_file: Option<String>,
        /// PEM client certificate chain for `tls_client_auth`; a renewed file is used on the
        /// next connection.
        #[serde(default)]
        client_cert_file: Option<String>,
        /// File holding the client assertion for `client_assertion` (a federated token: Azure
        /// workload identity, a CI OIDC token), re-read on every fetch. Default:
        /// `$AZURE_FEDERATED_TOKEN_FILE`.
        #[serde(default)]
        client_assertion_file: Option<String>,
        /// DPoP (RFC 9449): ask for tokens bound to a key that lives only in the sidecar,
        /// and send a fresh proof with each request (`Authorization: DPoP`).
        #[serde(default, deserialize_with = "lenient_bool")]
        dpop: Option<bool>,
        /// Replace the DPoP key this often; tokens bound to the old key are fetched again.
        /// Default `24h`.
        #[serde(default)]
        dpop_rotate_every: Option<String>,
        /// Fetch a token for each request, never cached (one token endpoint round trip per
        /// request).
        #[serde(default, deserialize_with = "lenient_bool")]
        per_call: Option<bool>,
        /// With `per_call`: revoke each token (RFC 7009) once its response has ended.
        #[serde(default, deserialize_with = "lenient_bool")]
        revoke_on_completion: Option<bool>,
        /// The revocation endpoint, for `revoke_on_completion`.
        #[serde(default)]
        revocation_url: Option<String>,
        /// `aud` of `private_key_jwt` assertions. Default: the token URL.
        #[serde(default)]
        assertion_audience: Option<String>,
        /// Bound on one token fetch. Default `2s`.
        #[serde(default)]
        timeout: Option<String>,
    },
    /// RFC 7523 §2.1 JWT bearer grant: an assertion (an ID-JAG for MCP enterprise-managed
    /// authorization, a federated JWT) traded for an access token.
    JwtBearer {
        /// Token endpoint; `https`, or `http` on a loopback address only.
        token_url: String,
        /// Client id. Not needed by a public client (`auth_method: none`).
        #[serde(default)]
        client_id: String,
        /// `client_secret_basic` (default), `client_secret_post`, `private_key_jwt`
        /// (RFC 7523, signed here), `client_assertion` (RFC 7523, an assertion issued
        /// elsewhere, read from a file) or `tls_client_auth` (RFC 8705).
        #[serde(default)]
        auth_method: Option<String>,
        /// File holding the client secret (read on every fetch); for the two secret methods.
        #[serde(default)]
        client_secret_file: Option<String>,
        /// PEM private key: signs `private_key_jwt` assertions (Ed25519, P-256 or RSA), or is
        /// the key of the `tls_client_auth` certificate. Read on every fetch.
        #[serde(default)]
        client_key_file: Option<String>,
        /// PEM client certificate chain for `tls_client_auth`; a renewed file is used on the
        /// next connection.
        #[serde(default)]
        client_cert_file: Option<String>,
        /// File holding the client assertion for `client_assertion` (a federated token: Azure
        /// workload identity, a CI OIDC token), re-read on every fetch. Default:
        /// `$AZURE_FEDERATED_TOKEN_FILE`.
        #[serde(default)]
        client_assertion_file: Option<String>,
        /// DPoP (RFC 9449): ask for tokens bound to a key that lives only in the sidecar,
        /// and send a fresh proof with each request (`Authorization: DPoP`).
        #[serde(default, deserialize_with = "lenient_bool")]
        dpop: Option<bool>,
        /// Replace the DPoP key this often; tokens bound to the old key are fetched again.
        /// Default `24h`.
        #[serde(default)]
        dpop_rotate_every: Option<String>,
        /// Fetch a token for each request, never cached (one token endpoint round trip per
        /// request).
        #[serde(default, deserialize_with = "lenient_bool")]
        per_call: Option<bool>,
        /// With `per_call`: revoke each token (RFC 7009) once its response has ended.
        #[serde(default, deserialize_with = "lenient_bool")]
        revoke_on_completion: Option<bool>,
        /// The revocation endpoint, for `revoke_on_completion`.
        #[serde(default)]
        revocation_url: Option<String>,
        /// `aud` of `private_key_jwt` assertions. Default: the token URL.
        #[serde(default)]
        assertion_audience: Option<String>,
        /// Bound on one token fetch. Default `2s`.
        #[serde(default)]
        timeout: Option<String>,
        /// File holding the assertion (an ID-JAG, a federated JWT), re-read on every fetch.
        #[serde(default)]
        assertion_file: Option<String>,
        /// Another credential (`token_exchange` or `client_credentials`) whose token is the
        /// assertion: an ID-JAG obtained by token exchange, traded here for an access token.
        #[serde(default)]
        assertion_from: Option<String>,
    },
    /// OAuth 2.0 token exchange (RFC 8693): the workload's own token (a projected
    /// service-account token or a JWT-SVID) exchanged for one scoped to the route.
    TokenExchange {
        /// Token endpoint; `https`, or `http` on a loopback address only.
        token_url: String,
        /// Client id. Not needed by a public client (`auth_method: none`, e.g. GCP's STS).
        #[serde(default)]
        client_id: String,
        /// `client_secret_basic` (default when a secret file is given), `client_secret_post`,
        /// `private_key_jwt`, `client_assertion`, `tls_client_auth`, or `none` (default without a secret file:
        /// the subject token is the proof).
        #[serde(default)]
        auth_method: Option<String>,
        /// File holding the client secret (read on every fetch); for the two secret methods.
        #[serde(default)]
        client_secret_file: Option<String>,
        /// PEM private key for `private_key_jwt` or `tls_client_auth` (see client_credentials).
        #[serde(default)]
        client_key_file: Option<String>,
        /// PEM client certificate chain for `tls_client_auth`.
        #[serde(default)]
        client_cert_file: Option<String>,
        /// File holding the client assertion for `client_assertion` (a federated token: Azure
        /// workload identity, a CI OIDC token), re-read on every fetch. Default:
        /// `$AZURE_FEDERATED_TOKEN_FILE`.
        #[serde(default)]
        client_assertion_file: Option<String>,
        /// DPoP (RFC 9449): ask for tokens bound to a key that lives only in the sidecar,
        /// and send a fresh proof with each request (`Authorization: DPoP`).
        #[serde(default, deserialize_with = "lenient_bool")]
        dpop: Option<bool>,
        /// Replace the DPoP key this often; tokens bound to the old key are fetched again.
        /// Default `24h`.
        #[serde(default)]
        dpop_rotate_every: Option<String>,
        /// Fetch a token for each request, never cached (one token endpoint round trip per
        /// request).
        #[serde(default, deserialize_with = "lenient_bool")]
        per_call: Option<bool>,
        /// With `per_call`: revoke each token (RFC 7009) once its response has ended.
        #[serde(default, deserialize_with = "lenient_bool")]
        revoke_on_completion: Option<bool>,
        /// The revocation endpoint, for `revoke_on_completion`.
        #[serde(default)]
        revocation_url: Option<String>,
        /// `aud` of `private_key_jwt` assertions. Default: the token URL.
        #[serde(default)]
        assertion_audience: Option<String>,
        /// File holding the subject token, read on every fetch; when it changes, tokens
        /// exchanged for the old one are no longer handed out. Default:
        /// `identity.subject_token_file`.
        #[serde(default)]
        subject_token_file: Option<String>,
        /// `subject_token_type`. Default `urn:ietf:params:oauth:token-type:jwt`.
        #[serde(default)]
        subject_token_type: Option<String>,
        /// File holding an actor token (the party acting for the subject), read on every fetch.
        #[serde(default)]
        actor_token_file: Option<String>,
        /// `actor_token_type`. Default `urn:ietf:params:oauth:token-type:jwt`.
        #[serde(default)]
        actor_token_type: Option<String>,
        /// `requested_token_type`, e.g. `urn:ietf:params:oauth:token-type:access_token`.
        /// Default: not sent (the server's choice).
        #[serde(default)]
        requested_token_type: Option<String>,
        /// `audience` asked for when the route names none (GCP workload identity federation:
        /// `//iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`).
        #[serde(default)]
        audience: Option<String>,
        /// Trade the exchanged token for a service account's access token (GCP IAM
        /// Credentials `generateAccessToken`).
        #[serde(default)]
        impersonate: Option<ImpersonateConfig>,
        /// On behalf of a user: the subject token is the user's, taken from this request
        /// header (and removed before forwarding); the workload's own token goes as the actor.
        #[serde(default)]
        subject_from: Option<SubjectFromConfig>,
        /// JWKS URL the user's token is verified against before it is sent anywhere.
        #[serde(default)]
        subject_jwks_url: Option<String>,
        /// Expected `iss` of the user's token (with `subject_jwks_url`).
        #[serde(default)]
        subject_issuer: Option<String>,
        /// Expected `aud` of the user's token (with `subject_jwks_url`).
        #[serde(default)]
        subject_audience: Option<String>,
        /// Bound on one token fetch. Default `2s`.
        #[serde(default)]
        timeout: Option<String>,
    },
    /// A secret that only the sidecar holds, read from the environment or a file.
    Static {
        /// Environment variable holding the secret.
        #[serde(default)]
        from_env: Option<String>,
        /// File holding the secret (trailing newline trimmed); re-read when it changes.
        #[serde(default)]
        from_file: Option<String>,
        /// AWS Secrets Manager: the secret, read with an `aws` credential's session.
        #[serde(default)]
        from_aws_secret: Option<AwsSecretConfig>,
        /// AWS SSM Parameter Store: the parameter (a SecureString is decrypted).
        #[serde(default)]
        from_aws_parameter: Option<AwsParameterConfig>,
        /// How often a store's value is read again. Default `5m`.
        #[serde(default)]
        refresh: Option<String>,
        /// How long the last good value from a store is used while reading it fails; then
        /// the credential fails closed. Default `1h`.
        #[serde(default)]
        max_stale: Option<String>,
    },
    /// AWS session credentials from STS `AssumeRoleWithWebIdentity`; requests on its routes
    /// are signed with SigV4.
    Aws {
        /// Region signed for when the host does not name one.
        region: String,
        /// The role to assume (with `web_identity_token_file`); absent: the container
        /// credentials endpoint (EKS Pod Identity, ECS) from the environment.
        #[serde(default)]
        role_arn: Option<String>,
        /// The projected web identity token (EKS IRSA); re-read on every fetch.
        #[serde(default)]
        web_identity_token_file: Option<String>,
        /// STS endpoint. Default `https://sts.<region>.amazonaws.com`.
        #[serde(default)]
        sts_endpoint: Option<String>,
        /// Session lifetime asked for, 15m to 12h. Default `1h`.
        #[serde(default)]
        session_duration: Option<String>,
        /// Role session name. Default `chaperone-<workload>`.
        #[serde(default)]
        session_name: Option<String>,
        /// Largest request body signed (the signature covers its hash); larger ones get 413.
        /// Default 8388608 (8 MiB). (A string here: the YAML reader hands scalars of an
        /// internally tagged `kind` over as text.)
        #[serde(default)]
        body_max_bytes: Option<String>,
        /// How long the STS call may take. Default `5s`.
        #[serde(default)]
        timeout: Option<String>,
    },
}

/// `token_exchange.subject_from`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SubjectFromConfig {
    /// The request header carrying the user's token (`Bearer ` prefix optional).
    pub(crate) header: String,
}

/// `token_exchange.impersonate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImpersonateConfig {
    /// The service account's email (`NAME@PROJECT.iam.gserviceaccount.com`).
    pub(crate) service_account: String,
    /// IAM Credentials endpoint. Default `https://iamcredentials.googleapis.com`.
    #[serde(default)]
    pub(crate) endpoint: Option<String>,
    /// Lifetime asked for, up to 1h. Default `1h`.
    #[serde(default)]
    pub(crate) lifetime: Option<String>,
}

/// `from_aws_secret`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AwsSecretConfig {
    /// The `aws` credential whose session reads the secret.
    pub(crate) credential: String,
    /// The secret's name or ARN.
    pub(crate) secret_id: String,
    /// For a JSON secret (`{"api_key": "..."}`), the key whose value is the credential.
    #[serde(default)]
    pub(crate) json_key: Option<String>,
    /// Version stage. Default `AWSCURRENT`.
    #[serde(default)]
    pub(crate) version_stage: Option<String>,
    /// Endpoint. Default `https://secretsmanager.REGION.amazonaws.com`, REGION the aws
    /// credential's.
    #[serde(default)]
    pub(crate) endpoint: Option<String>,
}

/// `from_aws_parameter`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AwsParameterConfig {
    /// The `aws` credential whose session reads the parameter.
    pub(crate) credential: String,
    /// The parameter's name (`/prod/slack/token`) or ARN.
    pub(crate) name: String,
    /// Endpoint. Default `https://ssm.REGION.amazonaws.com`.
    #[serde(default)]
    pub(crate) endpoint: Option<String>,
}

/// One route: which requests it matches and what the sidecar does for them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteConfig {
    /// Unique route name; it appears in logs, metrics and policy context.
    pub(crate) name: String,
    /// A vendor from the provider catalog (`chaperone providers`): fills in the hosts (HTTPS
    /// only), the credential's place, required version headers and OAuth scopes. The route's
    /// own keys override it.
    #[serde(default)]
    pub(crate) provider: Option<String>,
    /// Which requests this route takes. Required without `provider`.
    #[serde(rename = "match", default)]
    pub(crate) match_: Option<MatchConfig>,
    /// Name of the credential (under `credentials:`) injected on this route.
    #[serde(default)]
    pub(crate) credential: Option<String>,
    /// Where the credential goes. Default `authorization: Bearer {token}`.
    #[serde(default)]
    pub(crate) inject: Option<InjectConfig>,
    /// Purpose used when the request carries no `chaperone-purpose` header.
    #[serde(default)]
    pub(crate) purpose_default: Option<String>,
    /// Free-form labels handed to policy as `resource.labels`.
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    /// `aud` of minted tokens. Default: the destination origin.
    #[serde(default)]
    pub(crate) audience: Option<String>,
    /// RFC 8707 resource indicator asked of token endpoints. Default: none for token
    /// exchange; for client credentials the `audience` is sent as the resource.
    #[serde(default)]
    pub(crate) resource: Option<String>,
    /// Scopes requested or minted for this route. `{purpose}` in a scope is replaced by the
    /// request's purpose, which makes cached tokens per purpose.
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
    /// Longest lifetime a credential on this route should have, e.g. `5m`. A longer-lived
    /// (or never-expiring) credential is still used but flagged in the log and metrics.
    #[serde(default)]
    pub(crate) max_ttl: Option<String>,
    /// Overrides the global strip mode on this route.
    #[serde(default)]
    pub(crate) strip: Option<StripMode>,
    /// For an `aws` credential: the service and region signed for, where the host does not
    /// say (or says otherwise).
    #[serde(default)]
    pub(crate) sign: Option<SignConfig>,
    /// Overrides the global `connect`, `response_head` and `idle` timeouts on this route.
    #[serde(default)]
    pub(crate) timeouts: Option<RouteTimeoutsConfig>,
    /// An MCP server (streamable HTTP): each JSON-RPC message of a POST is read, so policy
    /// decides and the line names each tool call (`context.mcp`).
    #[serde(default)]
    pub(crate) mcp: bool,
    /// On an MCP route, per tool: the scopes its calls' token is asked for (or minted with)
    /// instead of the route's, and the types of the arguments policy reads
    /// (`context.mcp.arguments`). `search_docs: [docs.read]` is short for
    /// `search_docs: {scopes: [docs.read]}`.
    #[serde(default)]
    pub(crate) tools: BTreeMap<String, ToolConfig>,
    /// Take paths with encoded slashes or backslashes (`%2F`, `%5C`), which servers read
    /// differently and are otherwise refused (GitLab's `/projects/group%2Fproject`).
    #[serde(default)]
    pub(crate) allow_encoded_slashes: bool,
}

/// `routes[].tools.<name>`: a list of scopes, or `{scopes, arguments}`.
#[derive(Debug, Default)]
pub(crate) struct ToolConfig {
    /// Scopes for this tool's calls.
    pub(crate) scopes: Vec<String>,
    /// Argument name -> Cedar type (`String`, `Long`, `Bool`, `Set<String>`, `Set<Long>`).
    pub(crate) arguments: BTreeMap<String, String>,
}

/// The long form of [`ToolConfig`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolSpec {
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    arguments: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for ToolConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ToolConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of scopes, or `{scopes: [...], arguments: {name: Type}}`")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<ToolConfig, A::Error> {
                let scopes =
                    Vec::<String>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(ToolConfig {
                    scopes,
                    arguments: BTreeMap::new(),
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ToolConfig, A::Error> {
                let s = ToolSpec::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(ToolConfig {
                    scopes: s.scopes,
                    arguments: s.arguments,
                })
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<ToolConfig, E> {
                Ok(ToolConfig::default())
            }
        }
        d.deserialize_any(V)
    }
}

/// `routes[].sign`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignConfig {
    /// SigV4 signing name (`bedrock`, `secretsmanager`, `s3`, ...).
    #[serde(default)]
    pub(crate) service: Option<String>,
    /// Region.
    #[serde(default)]
    pub(crate) region: Option<String>,
}

/// A route's own timeouts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteTimeoutsConfig {
    /// Connecting to the upstream.
    #[serde(default)]
    pub(crate) connect: Option<String>,
    /// From sending the request to the response head.
    #[serde(default)]
    pub(crate) response_head: Option<String>,
    /// Longest silence between two pieces of the response body.
    #[serde(default)]
    pub(crate) idle: Option<String>,
}

/// Request matcher; every given field must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchConfig {
    /// Host name or IP literal, or a list of them; `*.example.org` matches any subdomain, one
    /// `*` inside a name part of one label (`bedrock-runtime.*.amazonaws.com`). Required
    /// without `provider`.
    #[serde(default)]
    pub(crate) host: Option<HostField>,
    /// `http` or `https`. Default: either.
    #[serde(default)]
    pub(crate) scheme: Option<String>,
    /// Destination port. Default: any.
    #[serde(default)]
    pub(crate) port: Option<u16>,
    /// Path prefix, e.g. `/v1/`. Default: any path.
    #[serde(default)]
    pub(crate) path_prefix: Option<String>,
    /// Allowed methods. Default: any method.
    #[serde(default)]
    pub(crate) methods: Vec<String>,
}

/// `match.host`: one pattern or a list.
#[derive(Debug, Clone)]
pub(crate) struct HostField(pub(crate) Vec<String>);

impl<'de> Deserialize<'de> for HostField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HostField;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a host name or a list of host names")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HostField, E> {
                Ok(HostField(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<HostField, A::Error> {
                let mut v = Vec::new();
                while let Some(h) = seq.next_element::<String>()? {
                    v.push(h);
                }
                Ok(HostField(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// How a credential is placed into the forwarded request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InjectConfig {
    /// Header name, e.g. `authorization` or `x-api-key`. Exactly one of `header` and
    /// `body_field` is set.
    #[serde(default)]
    pub(crate) header: Option<String>,
    /// A field of the JSON, form or multipart request body (e.g. `api_key` for APIs that
    /// take the key in the body): every value of that field is replaced by the credential,
    /// and the field is added (to the top-level object, as a form pair or as a part) when
    /// the body has none. An embedded secret found in
    /// this field is then replaced rather than refused (see `strip`).
    #[serde(default)]
    pub(crate) body_field: Option<String>,
    /// Value template; `{token}` is replaced by the credential. Default `{token}`.
    #[serde(default)]
    pub(crate) value: Option<String>,
}

/// Embedded-secret handling.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StripConfig {
    /// `strip`, `block` or `report`. Default `strip`.
    #[serde(default)]
    pub(crate) mode: StripMode,
    /// Largest request body inspected for secrets. Default 65536.
    #[serde(default)]
    pub(crate) body_max_bytes: Option<u64>,
    /// File with the key for secret fingerprints (HMAC). Absent: a random key per process,
    /// so fingerprints match within one run only.
    #[serde(default)]
    pub(crate) fingerprint_key_file: Option<String>,
}

/// Policy files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyConfig {
    /// Cedar policy file.
    pub(crate) file: String,
    /// Optional Cedar schema the policies are validated against.
    #[serde(default)]
    pub(crate) schema: Option<String>,
}

/// Purpose-log output.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogConfig {
    /// `json` (one object per line) or `pretty` (one readable line). Default `json`.
    #[serde(default)]
    pub(crate) format: Option<String>,
    /// `stdout`, `stderr` or a file path (appended). Default `stdout`.
    #[serde(default)]
    pub(crate) output: Option<String>,
}

/// `upstream_proxy`: chain through a corporate proxy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamProxyConfig {
    /// `http://host:port` of the proxy; credentials never go here (see `auth_file`).
    pub(crate) url: String,
    /// Destinations reached directly, as curl's `NO_PROXY` names them: host names (and their
    /// subdomains; a leading dot is the same), IP addresses, CIDR ranges, `*` for all.
    #[serde(default)]
    pub(crate) no_proxy: Vec<String>,
    /// A file holding `user:password` for the proxy (sent as Basic `Proxy-Authorization`).
    #[serde(default)]
    pub(crate) auth_file: Option<String>,
}

/// Timeouts; durations are strings with units (`500ms`, `30s`, `2m`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeoutsConfig {
    /// Connecting to an upstream. Default `5s`.
    #[serde(default)]
    pub(crate) connect: Option<String>,
    /// From sending a request upstream to its response head. Default `300s`: as long as an
    /// LLM may think before its answer starts.
    #[serde(default)]
    pub(crate) response_head: Option<String>,
    /// The former name of `response_head`, still accepted.
    #[serde(default)]
    pub(crate) request: Option<String>,
    /// Reading a client's request head; also how long an idle keep-alive client connection
    /// waits for its next request. Default `30s`.
    #[serde(default)]
    pub(crate) header_read: Option<String>,
    /// Longest silence: between two pieces of a response body (the upstream is given up on,
    /// `response_incomplete`), and in a CONNECT tunnel either way (it is closed). An SSE
    /// stream that keeps sending is never cut. Default `5m`.
    #[serde(default)]
    pub(crate) idle: Option<String>,
    /// On SIGTERM, how long in-flight requests may take to finish. Default `10s`.
    #[serde(default)]
    pub(crate) shutdown_grace: Option<String>,
}

/// A boolean inside a `kind`-tagged credential: serde's internally tagged enums hand the
/// YAML loader's scalars over as text, so `true` arrives as `"true"`.
fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<bool>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("true or false")
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v {
                "true" => Ok(Some(true)),
                "false" => Ok(Some(false)),
                _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
            }
        }
    }
    d.deserialize_any(V)
}

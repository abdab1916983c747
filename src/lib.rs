//! Chaperone: a sidecar proxy that gives AI workloads just-in-time, scoped credentials.
//!
//! A newcomer's map, top to bottom (a module imports only from below itself; `tests/layers.rs`
//! fails when one reaches the other way):
//!
//! ```text
//! main.rs, cli/       one module per subcommand (run, check, demo, ca, policy, scan, audit,
//!                     review, webhook, egress-lock, providers); fuzzing: the invariants the
//!                     fuzz targets check
//! sidecar             the composition root: Config -> every stage -> pipeline -> listeners
//! config/             the loader: YAML with positions, validation; builds each stage's
//!                     own settings type (no stage imports config)
//! proxy/ (ingress)    listeners, the one HTTP server builder, CONNECT, interception, drain
//! admin               health, readiness, metrics, JWKS
//! pipeline            the ordered stages, one call each, over a per-request context
//! stages              target -> identify -> route -> (on behalf of: credentials::user)
//!                     -> strip -> mcp -> policy -> credentials -> (proxy::upstream)
//!                     -> purpose_log
//! foundations         error, metrics, fingerprint, tls, egress (direct or through the
//!                     upstream proxy), resolve (names resolved for policy, pinned for
//!                     the connect)
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

#[cfg(not(feature = "aws-lc-rs"))]
compile_error!(
    "enable the `aws-lc-rs` feature: it selects the crypto backend for TLS and token signing"
);

pub mod admin;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod files;
pub mod fingerprint;
pub mod fuzzing;
pub mod identify;
pub mod mcp;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod proxy;
pub mod purpose_log;
pub mod resolve;
pub mod route;
pub mod sidecar;
pub mod strip;
pub mod target;
pub mod tls;

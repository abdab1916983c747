//! The data plane: everything that moves bytes. The stages decide; this module carries.
//!
//! ```text
//! listener ──▶ http (one server builder) ──▶ pipeline (the stages) ──▶ upstream ──▶ API
//!     │                                          ▲
//!     └─ CONNECT ─▶ connect ─┬─ intercept (TLS, then http again, each request the pipeline's)
//!                            └─ blind tunnel (splice, idle timer)
//! ```
//!
//! - [`listener`]: TCP and Unix-socket listeners, caller attestation ([`attest`]);
//! - [`worker`]: the worker threads, each with its [`worker::Proxy`]: its copy of the
//!   pipeline, and the dispatch of CONNECT to [`connect`] and of every other request to the
//!   pipeline;
//! - [`http`]: the one HTTP/1.1 + HTTP/2 server builder, its header limit and timers;
//! - [`connect`]: CONNECT, after the pipeline decided: blind tunnel or interception;
//! - [`intercept`]: TLS termination with leaf certificates from the local CA;
//! - [`upstream`]: the pooled upstream client the pipeline's forward stage sends through,
//!   guarded against the metadata and admin addresses at connect time;
//! - [`pool`]: each worker's connections to upstreams, on hyper's connection API;
//! - [`upgrade`]: WebSocket and other upgrades: the upgrade headers across the hop, and the
//!   relay of the switched connection after the pipeline passed on a 101;
//! - [`drain`] and [`idle`]: shutdown draining and idle timers.
//!
//! Nothing here imports `config`: settings arrive as the types below, built by the loader.
//! Requests reach the stages only through [`crate::pipeline`]. This file and [`upstream`]
//! (with [`pool`] and [`slots`]), [`upgrade`], [`drain`] and [`idle`] sit below the pipeline
//! (its forward stage sends through [`upstream`]); the rest sits above it (`tests/layers.rs`
//! holds both sides to that).

pub(crate) mod attest;
pub(crate) mod connect;
pub(crate) mod drain;
mod framing;
pub(crate) mod http;
pub(crate) mod idle;
pub(crate) mod intercept;
pub(crate) mod listener;
pub(crate) mod pool;
mod rewind;
pub(crate) mod slots;
mod sniff;
pub(crate) mod upgrade;
pub(crate) mod upstream;
pub(crate) mod worker;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identify::Identity;
use crate::route::HostMatch;
use crate::tls::UpstreamRoots;

/// Where a proxy listener binds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum ListenAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix socket at this path (`unix:/path` in the config); its callers are attested
    /// with `SO_PEERCRED`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The TCP address, if this is one.
    pub(crate) fn tcp(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "http://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One proxy listener and the identity it serves.
#[derive(Debug, Clone)]
pub(crate) struct ListenerSpec {
    /// Bind address.
    pub(crate) addr: ListenAddr,
    /// Identity of callers on this listener.
    pub(crate) identity: Identity,
    /// UIDs admitted on this listener (kernel-attested); `None` admits any local process.
    pub(crate) callers: Option<Vec<u32>>,
}

/// Validated timeouts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    /// Upstream connect.
    pub(crate) connect: Duration,
    /// From sending a request upstream to its response head.
    pub(crate) response_head: Duration,
    /// Client request head, a request body read whole for inspection, and idle keep-alive
    /// client connections.
    pub(crate) header_read: Duration,
    /// Longest silence in a response body or a tunnel.
    pub(crate) idle: Duration,
    /// Drain deadline on SIGTERM.
    pub(crate) shutdown_grace: Duration,
}

/// Validated TLS settings.
#[derive(Debug, Clone)]
pub(crate) struct TlsSettings {
    /// Local CA (certificate PEM, key PEM) when interception is on.
    pub(crate) ca: Option<(String, secrecy::SecretString)>,
    /// Roots for upstream verification.
    pub(crate) upstream_roots: UpstreamRoots,
    /// Hosts never intercepted.
    pub(crate) passthrough: Vec<HostMatch>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            ca: None,
            upstream_roots: UpstreamRoots::System,
            passthrough: Vec::new(),
        }
    }
}

//! Chaperone: a sidecar proxy that gives AI workloads just-in-time, scoped credentials.
//!
//! The request path is [`pipeline`]: identify, accept, route, strip, authorize, credential,
//! forward, log, one module per stage. [`config`] validates everything before a listener
//! binds; [`server`] wires the stages to listeners; [`admin`] serves health, metrics and JWKS.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(feature = "aws-lc-rs"))]
compile_error!(
    "enable the `aws-lc-rs` feature: it selects the crypto backend for TLS and token signing"
);

pub mod accept;
pub mod admin;
pub mod attest;
pub mod audit;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod drain;
pub mod egress_lock;
pub mod error;
pub mod fingerprint;
pub mod forward;
pub mod identify;
pub mod idle;
pub mod inject;
pub mod intercept;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod purpose_log;
pub mod review;
pub mod route;
pub mod scan;
pub mod server;
pub mod strip;
pub mod tls;
pub mod tunnel;

//! `chaperone run`: the sidecar itself, on a config or on embedded defaults (observe mode).

use std::net::SocketAddr;
use std::path::Path;

use super::Exit;
use crate::config::Config;
use crate::proxy::ListenAddr;
use crate::purpose_log::LogOutput;

/// Load the config (or the embedded defaults), start, serve until SIGTERM or Ctrl-C, drain.
/// 0 after a clean shutdown, 2 when it could not start.
pub(crate) fn command(
    config: Option<&Path>,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> Exit {
    super::init_tracing("info");
    // aws-lc seeds its random generator from CPU jitter on first use, tens of milliseconds
    // of one core. Nothing before ready needs it (the keys made at start come from the
    // kernel), but the first TLS handshake or ES256 signature would: it is begun now, on its
    // own thread at the lowest priority, so it yields the cores to the start and is done
    // before the first request. The system trust store is read beside the configuration and
    // the policy compile too (start to ready: BENCHMARKS.md).
    std::thread::spawn(|| {
        // On Linux a thread id names that one thread to setpriority(2).
        let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19);
        let _ = aws_lc_rs::rand::fill(&mut [0u8; 8]);
    });
    crate::tls::prefetch_system_roots();
    let mut cfg = match config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(errs) => {
                super::print_config_errors(&errs);
                eprintln!(
                    "chaperone: not started: {} configuration error(s)",
                    errs.0.len()
                );
                return Exit::Error;
            }
        },
        None => Config::embedded_default(),
    };
    if let Some(l) = listen {
        cfg.listeners[0].addr = ListenAddr::Tcp(l);
    }
    if let Some(a) = admin {
        cfg.admin = a;
    }
    super::runtime().block_on(run(cfg))
}

async fn run(cfg: Config) -> Exit {
    let observe = cfg.observe_mode;
    let source = cfg.source.clone();
    let log_to = match &cfg.log_output {
        LogOutput::Stdout => "stdout".to_string(),
        LogOutput::Stderr => "stderr".to_string(),
        LogOutput::File(p) => p.display().to_string(),
    };
    let identities: Vec<String> = cfg
        .listeners
        .iter()
        .map(|l| format!("{} (stage {})", l.identity.id, l.identity.stage))
        .collect();
    let running = match crate::sidecar::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaperone: not started: {e}");
            return Exit::Error;
        }
    };
    for (addr, id) in running.listening.iter().zip(&identities) {
        eprintln!("chaperone: proxy listening on {addr} for {id}");
    }
    eprintln!(
        "chaperone: admin on http://{} (/healthz /readyz /metrics /.well-known/jwks.json); purpose log to {log_to}; config {source}",
        running.admin_addr
    );
    if observe {
        eprintln!(
            "chaperone: OBSERVE MODE (no --config): every request is proxied and logged except guardrail \
             addresses (cloud metadata, link-local, the sidecar's own ports); embedded secrets are \
             reported, not removed; no credential is injected. Point the app at it with \
             HTTP_PROXY=http://{}, then enforce with `chaperone run --config FILE`.",
            running.proxy_addrs[0]
        );
    }
    wait_for_signal().await;
    eprintln!("chaperone: shutting down, draining in-flight requests");
    running.shutdown().await;
    Exit::Ok
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

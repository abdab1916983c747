#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use chaperone::config::Config;

/// mimalloc instead of glibc malloc: allocation was the largest item in the request-path
/// profile (about 12% of CPU under load); see BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Chaperone: just-in-time, scoped credentials for AI workloads, as a sidecar proxy.
#[derive(Parser)]
#[command(name = "chaperone", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar. Without --config it starts on embedded defaults in observe mode.
    Run {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override the proxy listener address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override the admin server address.
        #[arg(long)]
        admin: Option<SocketAddr>,
    },
    /// Validate a configuration without starting; lists every error as FILE:LINE:COL: key: message.
    Check {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole job end to end on loopback: a model API, the sidecar and a scripted agent.
    Demo,
    /// Report the embedded secrets `strip` would remove from recorded requests (a HAR file or
    /// JSON lines), without sending anything. Exit status: 0 none found, 1 found, 2 error.
    Scan {
        /// HAR file, or JSON lines of {"method", "url", "headers", "body"}; `-` for stdin.
        file: PathBuf,
        /// One JSON object per request instead of the report.
        #[arg(long)]
        json: bool,
        /// Use this configuration's fingerprint key, so fingerprints match its purpose log.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check, evaluate and test Cedar policy without running the sidecar. Exit status: 0
    /// valid / allowed / all cases pass, 1 denied / a case failed, 2 error.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Summarize purpose logs for SREs and reviews: traffic by identity, stage, purpose and
    /// destination; denials with reasons; embedded secrets by type and fingerprint with first
    /// and last seen; credentials used. Exit status 0, or 2 if a file cannot be read.
    Audit {
        /// Purpose-log files: plain, rotated or gzip (detected by content); `-` for stdin.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// One JSON report (every row) instead of tables.
        #[arg(long)]
        json: bool,
        /// Rows per table.
        #[arg(long, default_value_t = 20)]
        top: usize,
    },
    /// Least-privilege review after deployment: routes, credentials, scopes and policies
    /// never used in the logs' window; stages reaching destinations outside their function;
    /// a suggested tighter policy, checked to allow everything seen. Exit 0, or 2 on error.
    Review {
        /// Configuration file (YAML) whose grants are reviewed.
        #[arg(long, short)]
        config: PathBuf,
        /// Purpose-log files: plain, rotated or gzip; `-` for stdin.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also write the suggested policy to this file.
        #[arg(long)]
        suggest_out: Option<PathBuf>,
    },
    /// Serve the mutating admission webhook that adds the sidecar to pods annotated
    /// `chaperone.dev/inject: "true"` (AdmissionReview v1, JSONPatch, over TLS).
    Inject {
        /// What to inject (YAML: image, config_map, ca_secret, fingerprint_secret,
        /// token_audience, sidecar_uid).
        #[arg(long, short)]
        config: PathBuf,
        /// Address to serve HTTPS on.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// Serving certificate (PEM); re-read when it changes.
        #[arg(long)]
        tls_cert: PathBuf,
        /// Its private key (PEM).
        #[arg(long)]
        tls_key: PathBuf,
    },
    /// Make the sidecar the app's only way out of the pod: netfilter rules (iptables-restore,
    /// IPv4 and IPv6) that let only loopback, replies, the exempt UIDs, DNS to the pod's
    /// resolvers and the allowed destinations leave. Run as a first init container with
    /// NET_ADMIN (deploy/components/egress-lock). Exit 0 locked, 2 error (the pod does not start).
    EgressLock {
        /// UID whose connections may go anywhere: the sidecar's (repeat for other exempt
        /// users).
        #[arg(long = "proxy-uid", required = true)]
        proxy_uids: Vec<u32>,
        /// A destination every container may reach directly, as an address or CIDR (e.g.
        /// the Kubernetes API, when the app lists it in NO_PROXY). Repeatable.
        #[arg(long, value_parser = chaperone::egress_lock::parse_destination)]
        allow: Vec<ipnet::IpNet>,
        /// Do not let containers query the resolvers of --resolv-conf directly.
        #[arg(long)]
        no_dns: bool,
        /// Where the pod's resolvers are listed.
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// Print the iptables-restore input for both families and change nothing.
        #[arg(long)]
        print: bool,
    },
    /// The local CA that signs intercepted HTTPS connections.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate the config's policy against the schema; list the policy ids and warnings.
    Check {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Decide one request as the sidecar would (route, purpose, guardrails, policy), without
    /// sending it; print the decision, the deciding policy ids and the reason.
    Eval {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// The request (boxed: it is much larger than the other commands' arguments).
        #[command(flatten)]
        request: Box<chaperone::policy::WhatIf>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Decide every case of a CASES file (requests with expected decisions) for CI.
    Test {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// The cases (YAML: `cases: [{name, method, url, purpose, stage, expect, ...}]`).
        cases: PathBuf,
        /// One JSON report instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the schema policies are validated against (with the config's route labels).
    Schema {
        /// Configuration file (YAML); without it the shipped schema.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA (ECDSA P-256): DIR/ca.pem, and DIR/ca-key.pem with mode 0600.
    Init {
        /// Directory for the files.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (short, so a leaked key ages out).
        #[arg(long, default_value_t = chaperone::tls::DEFAULT_CA_DAYS)]
        days: u32,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("CHAPERONE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CHAPERONE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.compact().init();
    }
}

/// The control runtime: acceptors, admin, file watches. Proxy traffic runs on the server's own
/// worker threads, so one thread is enough here.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("chaperone")
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} listener(s), {} route(s), {} credential(s))",
                    cfg.source,
                    cfg.listeners.len(),
                    cfg.routes.len(),
                    cfg.credentials.len()
                );
                ExitCode::SUCCESS
            }
            Err(errs) => {
                for e in &errs.0 {
                    eprintln!("{e}");
                }
                eprintln!("{} error(s)", errs.0.len());
                ExitCode::FAILURE
            }
        },
        Cmd::Run {
            config,
            listen,
            admin,
        } => {
            init_tracing();
            let mut cfg = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(errs) => {
                        for e in &errs.0 {
                            eprintln!("{e}");
                        }
                        eprintln!(
                            "chaperone: not started: {} configuration error(s)",
                            errs.0.len()
                        );
                        return ExitCode::from(2);
                    }
                },
                None => Config::embedded_default(),
            };
            if let Some(l) = listen {
                cfg.listeners[0].addr = chaperone::config::ListenAddr::Tcp(l);
            }
            if let Some(a) = admin {
                cfg.admin = a;
            }
            runtime().block_on(run(cfg))
        }
        Cmd::Ca {
            cmd: CaCmd::Init { out, days, force },
        } => match chaperone::tls::init_ca(&out, days, force) {
            Ok((cert, key)) => {
                println!("CA certificate: {} (valid {days} days)", cert.display());
                println!(
                    "CA key:         {} (mode 0600; keep it secret)",
                    key.display()
                );
                println!(
                    "Use it:  tls: {{ ca_cert: {}, ca_key: {} }}",
                    cert.display(),
                    key.display()
                );
                println!("Trust it in the app: see README.md, \"Trusting the local CA\".");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chaperone ca init: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Scan { file, json, config } => scan(&file, json, config.as_deref()),
        Cmd::Policy { cmd } => ExitCode::from(policy(cmd)),
        Cmd::Audit { logs, json, top } => audit(&logs, json, top),
        Cmd::Review {
            config,
            logs,
            json,
            suggest_out,
        } => review(&config, &logs, json, suggest_out.as_deref()),
        Cmd::Inject {
            config,
            listen,
            tls_cert,
            tls_key,
        } => {
            init_tracing();
            let cfg = match chaperone::inject::InjectConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("chaperone inject: {e}");
                    return ExitCode::from(2);
                }
            };
            match runtime().block_on(chaperone::inject::serve(listen, &tls_cert, &tls_key, cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("chaperone inject: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::EgressLock {
            proxy_uids,
            allow,
            no_dns,
            resolv_conf,
            print,
        } => egress_lock(proxy_uids, allow, no_dns, &resolv_conf, print),
        Cmd::Demo => {
            init_demo_tracing();
            runtime().block_on(chaperone::demo::run())
        }
    }
}

fn egress_lock(
    exempt_uids: Vec<u32>,
    allow: Vec<ipnet::IpNet>,
    no_dns: bool,
    resolv_conf: &std::path::Path,
    print: bool,
) -> ExitCode {
    use chaperone::egress_lock::{Family, Lock, apply, ipv6_enabled, resolvers};
    let resolvers = if no_dns {
        Vec::new()
    } else {
        match std::fs::read_to_string(resolv_conf) {
            Ok(text) => resolvers(&text),
            Err(e) => {
                eprintln!(
                    "chaperone egress-lock: {}: {e} (or pass --no-dns)",
                    resolv_conf.display()
                );
                return ExitCode::from(2);
            }
        }
    };
    let lock = Lock {
        exempt_uids,
        allow,
        resolvers,
    };
    if print {
        for family in [Family::V4, Family::V6] {
            println!("# {}", family.name());
            print!("{}", lock.restore_input(family, 0));
        }
        return ExitCode::SUCCESS;
    }
    let mut families = vec![Family::V4];
    if ipv6_enabled() {
        families.push(Family::V6);
    } else {
        eprintln!("chaperone egress-lock: the kernel has no IPv6; IPv4 only");
    }
    for family in families {
        match apply(&lock, family) {
            Ok(done) => eprintln!(
                "chaperone egress-lock: {} locked: {} rule(s) in {}, jumped to first from OUTPUT",
                family.name(),
                done.rules.len(),
                chaperone::egress_lock::CHAIN
            ),
            Err(e) => {
                eprintln!("chaperone egress-lock: {e}");
                return ExitCode::from(2);
            }
        }
    }
    use chaperone::egress_lock::listing;
    eprintln!(
        "chaperone egress-lock: leaving the pod directly: loopback, replies, UID(s) {}, DNS to {}, destinations {}; everything else is refused",
        listing(&lock.exempt_uids),
        listing(&lock.resolvers),
        listing(&lock.allow)
    );
    ExitCode::SUCCESS
}

fn audit(logs: &[PathBuf], json: bool, top: usize) -> ExitCode {
    let mut a = chaperone::audit::Auditor::new();
    for path in logs {
        if let Err(e) = a.read_path(path) {
            eprintln!("chaperone audit: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let report = a.finish();
    print_report(json, &report, |r| chaperone::audit::render(r, top))
}

fn review(
    config: &std::path::Path,
    logs: &[PathBuf],
    json: bool,
    suggest_out: Option<&std::path::Path>,
) -> ExitCode {
    let Some((cfg, engine)) = chaperone::policy::cli::load(config, &mut std::io::stderr()) else {
        return ExitCode::from(2);
    };
    let paths: Vec<&std::path::Path> = logs.iter().map(PathBuf::as_path).collect();
    let r = match chaperone::review::review(&cfg, &engine, &paths) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaperone review: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(out) = suggest_out
        && let Err(e) = std::fs::write(out, &r.suggested_policy)
    {
        eprintln!("chaperone review: {}: {e}", out.display());
        return ExitCode::from(2);
    }
    print_report(json, &r, chaperone::review::render)
}

/// A report on stdout: one JSON line with `--json`, else its text rendering.
fn print_report<T: serde::Serialize>(
    json: bool,
    report: &T,
    text: impl Fn(&T) -> String,
) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string(report).expect("reports serialize")
        );
    } else {
        print!("{}", text(report));
    }
    ExitCode::SUCCESS
}

fn policy(cmd: PolicyCmd) -> u8 {
    use chaperone::policy::cli;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    match cmd {
        PolicyCmd::Check { config } => cli::check(&config, &mut out, &mut err),
        PolicyCmd::Eval {
            config,
            request,
            json,
        } => cli::eval(&config, &request, json, &mut out, &mut err),
        PolicyCmd::Test {
            config,
            cases,
            json,
        } => cli::test(&config, &cases, json, &mut out, &mut err),
        PolicyCmd::Schema { config } => cli::schema(config.as_deref(), &mut out, &mut err),
    }
}

fn scan(file: &std::path::Path, json: bool, config: Option<&std::path::Path>) -> ExitCode {
    let key_file = match config.map(Config::load).transpose() {
        Ok(cfg) => cfg.and_then(|c| c.strip.fingerprint_key_file),
        Err(errs) => {
            for e in &errs.0 {
                eprintln!("{e}");
            }
            return ExitCode::from(2);
        }
    };
    let fp = match chaperone::fingerprint::Fingerprinter::from_file_or_random(key_file.as_deref()) {
        Ok(fp) => fp,
        Err(e) => {
            eprintln!("chaperone scan: fingerprint key: {e}");
            return ExitCode::from(2);
        }
    };
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
    } else {
        std::fs::read_to_string(file)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("chaperone scan: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match chaperone::scan::report(&fp, &text, json) {
        Ok((out, found)) => {
            print!("{out}");
            if found {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("chaperone scan: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

fn init_demo_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("CHAPERONE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .compact()
        .init();
}

async fn run(cfg: Config) -> ExitCode {
    let observe = cfg.observe_mode;
    let source = cfg.source.clone();
    let log_to = match &cfg.log_output {
        chaperone::config::LogOutput::Stdout => "stdout".to_string(),
        chaperone::config::LogOutput::Stderr => "stderr".to_string(),
        chaperone::config::LogOutput::File(p) => p.display().to_string(),
    };
    let identities: Vec<String> = cfg
        .listeners
        .iter()
        .map(|l| format!("{} (stage {})", l.identity.id, l.identity.stage))
        .collect();
    let running = match chaperone::server::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaperone: not started: {e}");
            return ExitCode::from(2);
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
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

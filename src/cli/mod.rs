//! The subcommands, one module each; `main.rs` only parses and dispatches here.
//!
//! Every subcommand exits with the same scheme ([`Exit`]): 0 success, 1 a finding or a
//! denial (secrets found by `scan`, a request `policy eval` denies, a failed policy case),
//! 2 a usage, configuration or I/O error (clap's own usage errors are 2 as well).

pub(crate) mod audit;
pub(crate) mod ca;
pub(crate) mod check;
pub(crate) mod demo;
pub(crate) mod egress_lock;
pub(crate) mod policy;
pub(crate) mod providers;
pub(crate) mod review;
pub(crate) mod run;
pub(crate) mod scan;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// How a subcommand ended; the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0: done, valid, allowed, nothing found.
    Ok,
    /// 1: the answer is no: a finding or a denial.
    Finding,
    /// 2: the question could not be answered: usage, configuration or I/O error.
    Error,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(match e {
            Exit::Ok => 0,
            Exit::Finding => 1,
            Exit::Error => 2,
        })
    }
}

/// Chaperone: just-in-time, scoped credentials for AI workloads, as a sidecar proxy.
#[derive(Parser)]
#[command(name = "chaperone", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(missing_docs)] // clap turns doc comments into help text; the variants carry it
pub(crate) enum Cmd {
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
    /// Validate a configuration without starting; lists every error as FILE:LINE:COL: key:
    /// message. Exit 0 valid, 2 invalid.
    Check {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole job end to end on loopback: a model API, the sidecar and a scripted agent.
    Demo,
    /// List the provider catalog (`provider: NAME` on a route): each vendor's hosts, how it
    /// takes a credential, the version headers it requires, and where it documents them.
    Providers {
        /// One JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
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
        #[allow(missing_docs)]
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
    /// `chaperone.dev/inject: "true"` (AdmissionReview v1, JSONPatch, over TLS). Exit 0 on a
    /// clean stop, 2 on a config or TLS error. `inject` is its former name, still accepted.
    #[command(alias = "inject")]
    Webhook {
        /// What to inject (YAML: image, config_map, ca_secret, fingerprint_secret,
        /// token_audience, sidecar_uid).
        #[arg(long, short)]
        config: PathBuf,
        /// Address to serve HTTPS on. Loopback by default: in a cluster the API server reaches
        /// the pod's address, so the manifest says `--listen 0.0.0.0:8443` on purpose.
        #[arg(long, default_value = "127.0.0.1:8443")]
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
        #[arg(long, value_parser = egress_lock::parse_destination)]
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
        #[allow(missing_docs)]
        #[command(subcommand)]
        cmd: CaCmd,
    },
}

#[derive(Subcommand)]
#[allow(missing_docs)] // clap turns doc comments into help text; the variants carry it
pub(crate) enum PolicyCmd {
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
        request: Box<policy::WhatIf>,
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
#[allow(missing_docs)] // clap turns doc comments into help text; the variants carry it
pub(crate) enum CaCmd {
    /// Create a CA (ECDSA P-256): DIR/ca.pem, and DIR/ca-key.pem with mode 0600.
    Init {
        /// Directory for the files.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (short, so a leaked key ages out).
        #[arg(long, default_value_t = crate::tls::DEFAULT_CA_DAYS)]
        days: u32,
        /// Replace an existing CA in DIR.
        #[arg(long)]
        force: bool,
    },
}

/// Parse the command line and run the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let exit = match cli.cmd {
        Cmd::Check { config } => check::command(&config),
        Cmd::Providers { json } => providers::command(json),
        Cmd::Run {
            config,
            listen,
            admin,
        } => run::command(config.as_deref(), listen, admin),
        Cmd::Ca {
            cmd: CaCmd::Init { out, days, force },
        } => ca::init(&out, days, force),
        Cmd::Scan { file, json, config } => scan::command(&file, json, config.as_deref()),
        Cmd::Policy { cmd } => policy::command(cmd),
        Cmd::Audit { logs, json, top } => audit::command(&logs, json, top),
        Cmd::Review {
            config,
            logs,
            json,
            suggest_out,
        } => review::command(&config, &logs, json, suggest_out.as_deref()),
        Cmd::Webhook {
            config,
            listen,
            tls_cert,
            tls_key,
        } => webhook::command(&config, listen, &tls_cert, &tls_key),
        Cmd::EgressLock {
            proxy_uids,
            allow,
            no_dns,
            resolv_conf,
            print,
        } => egress_lock::command(proxy_uids, allow, no_dns, &resolv_conf, print),
        Cmd::Demo => demo::command(),
    };
    exit.into()
}

/// Diagnostics (not the purpose log) to stderr, filtered by `CHAPERONE_LOG` (default
/// `default_level`), as JSON when `CHAPERONE_LOG_FORMAT=json`.
fn init_tracing(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("CHAPERONE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
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

/// The control runtime: acceptors, admin, file watches. Proxy traffic runs on the proxy's own
/// worker threads, so one thread is enough here.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("chaperone")
        .build()
        .expect("tokio runtime")
}

/// Print every configuration error, one `FILE:LINE:COL: key: message` a line.
fn print_config_errors(errs: &crate::config::ConfigErrors) {
    for e in &errs.0 {
        eprintln!("{e}");
    }
}

/// A report on stdout: one JSON line with `--json`, else its text rendering.
fn print_report<T: serde::Serialize>(json: bool, report: &T, text: impl Fn(&T) -> String) -> Exit {
    if json {
        let mut line = serde_json::to_string(report).expect("reports serialize");
        line.push('\n');
        emit(&line);
    } else {
        emit(&text(report));
    }
    Exit::Ok
}

/// Write a report to stdout. A reader that went away (`| head`) ends the output quietly,
/// as it does for any Unix tool, instead of a panic.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("chaperone: cannot write to stdout: {e}");
    }
}

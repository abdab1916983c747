//! Stage 8, log: one purpose-log line per request (DESIGN §7), also on denial and error.
//!
//! Lines are serialized on the request path and handed to a writer thread through a bounded
//! channel, so a slow disk never stalls a request. If the channel is full the line is dropped
//! and counted (`chaperone_log_dropped_total`) rather than blocking the proxy.

use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::{LogFormat, LogOutput};
use crate::metrics::Metrics;
use crate::strip::Finding;

/// The credential part of a log line: never the value.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialLog {
    /// Credential name.
    pub name: String,
    /// Kind (`jwt`, `static`, ...).
    pub kind: &'static str,
    /// The token's `jti`, or a fingerprint.
    pub id: String,
    /// Expiry (Unix seconds).
    pub expires_at: Option<u64>,
    /// Scopes.
    pub scopes: Vec<String>,
}

/// One purpose-log line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Time the request arrived (RFC 3339, UTC).
    pub ts: String,
    /// Request id.
    pub request_id: String,
    /// W3C trace id, if the request carried one.
    pub trace_id: Option<String>,
    /// Workload identity.
    pub identity: String,
    /// Workload name.
    pub workload: String,
    /// Stage.
    pub stage: String,
    /// Environment.
    pub environment: String,
    /// Purpose (as decided: header, route default or `unspecified`).
    pub purpose: String,
    /// `http` for proxied requests, `tunnel` for CONNECT tunnels.
    pub kind: &'static str,
    /// Method.
    pub method: String,
    /// Scheme.
    pub scheme: String,
    /// Destination host.
    pub host: String,
    /// Destination port.
    pub port: u16,
    /// Path, without query.
    pub path: String,
    /// Query with every value redacted.
    pub query: Option<String>,
    /// Matched route.
    pub route: Option<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// Why, in words.
    pub reason: Option<String>,
    /// Deciding policies.
    pub policy_ids: Vec<String>,
    /// Injected credential.
    pub credential: Option<CredentialLog>,
    /// Embedded secrets found.
    pub stripped: Vec<Finding>,
    /// What was done with them: `strip`, `block` or `report`.
    pub strip_mode: &'static str,
    /// Status returned to the app.
    pub status: u16,
    /// Total time until the response body ended.
    pub duration_ms: f64,
    /// Time from sending upstream to the response head.
    pub upstream_ms: Option<f64>,
    /// Error code (`upstream_unreachable`, ...), if the request failed.
    pub error: Option<String>,
    /// Client address.
    pub client: String,
    /// Response body bytes sent to the app (tunnels: bytes from the upstream).
    pub bytes_out: u64,
    /// Tunnels: bytes from the app.
    pub bytes_in: Option<u64>,
}

impl Record {
    /// A record for a request that just arrived; stages fill in the rest.
    pub fn new(now: SystemTime) -> Record {
        Record {
            ts: humantime::format_rfc3339_millis(now).to_string(),
            request_id: String::new(),
            trace_id: None,
            identity: String::new(),
            workload: String::new(),
            stage: String::new(),
            environment: String::new(),
            purpose: String::new(),
            kind: "http",
            method: String::new(),
            scheme: String::new(),
            host: String::new(),
            port: 0,
            path: String::new(),
            query: None,
            route: None,
            decision: "deny",
            reason: None,
            policy_ids: Vec::new(),
            credential: None,
            stripped: Vec::new(),
            strip_mode: "strip",
            status: 0,
            duration_ms: 0.0,
            upstream_ms: None,
            error: None,
            client: String::new(),
            bytes_out: 0,
            bytes_in: None,
        }
    }

    fn pretty(&self) -> String {
        let stripped: Vec<String> = self
            .stripped
            .iter()
            .map(|f| format!("{}@{}#{}", f.kind, f.location, f.fingerprint))
            .collect();
        format!(
            "{} {} {} {} {}://{}:{}{} route={} purpose={} identity={} stage={} credential={} stripped=[{}] {:.2}ms{}{}",
            self.ts,
            self.decision,
            self.status,
            self.method,
            self.scheme,
            self.host,
            self.port,
            self.path,
            self.route.as_deref().unwrap_or("-"),
            self.purpose,
            self.identity,
            self.stage,
            self.credential
                .as_ref()
                .map_or("-".to_string(), |c| format!("{}:{}", c.name, c.id)),
            stripped.join(","),
            self.duration_ms,
            self.reason
                .as_ref()
                .map_or(String::new(), |r| format!(" reason=\"{r}\"")),
            self.error
                .as_ref()
                .map_or(String::new(), |e| format!(" error={e}")),
        )
    }
}

/// Handle to the purpose-log writer; cheap to clone.
#[derive(Clone)]
pub struct PurposeLog {
    tx: SyncSender<Vec<u8>>,
    format: LogFormat,
    metrics: Arc<Metrics>,
}

/// Joins the writer thread once every handle is gone, so nothing is lost at exit.
pub struct LogWriterGuard(Option<JoinHandle<()>>);

impl LogWriterGuard {
    /// Wait for the writer to drain (all `PurposeLog` handles must be dropped first).
    pub fn finish(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl PurposeLog {
    /// Start the writer.
    pub fn start(
        format: LogFormat,
        output: &LogOutput,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(PurposeLog, LogWriterGuard)> {
        let sink: Box<dyn Write + Send> = match output {
            LogOutput::Stdout => Box::new(std::io::stdout()),
            LogOutput::Stderr => Box::new(std::io::stderr()),
            LogOutput::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(65_536);
        let handle = std::thread::Builder::new()
            .name("purpose-log".into())
            .spawn(move || writer(rx, sink))?;
        Ok((
            PurposeLog {
                tx,
                format,
                metrics,
            },
            LogWriterGuard(Some(handle)),
        ))
    }

    /// Write one record.
    pub fn emit(&self, rec: &Record) {
        let mut line = match self.format {
            LogFormat::Json => serde_json::to_vec(rec).unwrap_or_default(),
            LogFormat::Pretty => rec.pretty().into_bytes(),
        };
        line.push(b'\n');
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.log_dropped.inc();
            }
        }
    }
}

fn writer(rx: Receiver<Vec<u8>>, sink: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, sink);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        // Batch whatever else is queued, then flush so lines show up promptly.
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(&more);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

//! Stage 8, log: one purpose-log line per request (DESIGN §7), also on denial and error.
//!
//! Lines are serialized on the request path and appended to a shared buffer; a writer thread
//! swaps the buffer out and writes it every [`FLUSH_EVERY`] (sooner when it fills), so a
//! request never waits on the disk and never wakes a thread per line. If the writer falls
//! behind by more than [`MAX_PENDING_BYTES`], lines are dropped and counted
//! (`chaperone_log_dropped_total`) rather than stalling the proxy or growing without bound.

use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::strip::Finding;

/// Purpose-log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// One JSON object per line.
    Json,
    /// One human-readable line.
    Pretty,
}

/// Where purpose-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LogOutput {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

/// The credential part of a log line: never the value.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CredentialLog {
    /// Credential name.
    pub(crate) name: String,
    /// Kind (`jwt`, `static`, ...).
    pub(crate) kind: &'static str,
    /// The token's `jti`, or a fingerprint.
    pub(crate) id: String,
    /// Expiry (Unix seconds).
    pub(crate) expires_at: Option<u64>,
    /// Scopes.
    pub(crate) scopes: Vec<String>,
    /// Checks the credential failed (`unrequested_scope`, `ttl_exceeds_max`, ...); absent
    /// when it passed them all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) flags: Vec<&'static str>,
    /// The RFC 8707 resource the token was obtained for, when an MCP server named it
    /// (its protected-resource metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) resource: Option<String>,
}

impl From<crate::credentials::Issued> for CredentialLog {
    /// What the line says of an injected credential: everything but its value.
    fn from(issued: crate::credentials::Issued) -> Self {
        CredentialLog {
            name: issued.name,
            kind: issued.kind,
            id: issued.id,
            expires_at: issued.expires_at,
            scopes: issued.scopes,
            flags: issued.flags,
            resource: None,
        }
    }
}

/// `on_behalf_of` in a line.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct OnBehalfLog {
    /// The user token's `iss`.
    pub(crate) iss: String,
    /// Its `sub`.
    pub(crate) sub: String,
    /// Whether it was verified against the issuer's keys.
    pub(crate) verified: bool,
}

/// One purpose-log line.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Record {
    /// Time the request arrived (RFC 3339, UTC).
    pub(crate) ts: String,
    /// Request id.
    pub(crate) request_id: String,
    /// W3C trace id, if the request carried one.
    pub(crate) trace_id: Option<String>,
    /// Workload identity.
    pub(crate) identity: String,
    /// Workload name.
    pub(crate) workload: String,
    /// Stage.
    pub(crate) stage: String,
    /// Environment.
    pub(crate) environment: String,
    /// Purpose (as decided: header, route default or `unspecified`).
    pub(crate) purpose: String,
    /// `http` for proxied requests, `tunnel` for CONNECT tunnels.
    pub(crate) kind: &'static str,
    /// Method.
    pub(crate) method: String,
    /// Scheme.
    pub(crate) scheme: String,
    /// Destination host.
    pub(crate) host: String,
    /// Destination port.
    pub(crate) port: u16,
    /// The destination's address as policy saw it (`context.address`): an IP literal, or
    /// the address a name was resolved and pinned to when a policy reads it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) address: Option<String>,
    /// Path, without query.
    pub(crate) path: String,
    /// Query with every value redacted.
    pub(crate) query: Option<String>,
    /// Matched route.
    pub(crate) route: Option<String>,
    /// `allow` or `deny`.
    pub(crate) decision: &'static str,
    /// Why, in words.
    pub(crate) reason: Option<String>,
    /// Deciding policies.
    pub(crate) policy_ids: Vec<String>,
    /// The user the request acted for (an on-behalf-of exchange): the user token's issuer
    /// and subject, never the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) on_behalf_of: Option<OnBehalfLog>,
    /// On an MCP route, the JSON-RPC message the POST carried (the first of a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) mcp: Option<crate::mcp::McpLog>,
    /// Injected credential.
    pub(crate) credential: Option<CredentialLog>,
    /// Embedded secrets found.
    pub(crate) stripped: Vec<Finding>,
    /// What was done with them: `strip`, `block` or `report`.
    pub(crate) strip_mode: &'static str,
    /// Whether the body was inspected: `inspected`, `skipped_too_large` (over
    /// `strip.body_max_bytes`) or `skipped_encoded` (compressed); absent for bodies that are
    /// not JSON or form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) body_scan: Option<&'static str>,
    /// Status returned to the app.
    pub(crate) status: u16,
    /// Who chose that status: `upstream` (relayed as the upstream answered) or `chaperone`
    /// (a refusal or failure of the proxy's, or a tunnel it opened); null when no answer was
    /// sent (the client left first).
    pub(crate) answered_by: Option<&'static str>,
    /// The HTTP version the upstream answered with (`HTTP/1.1`, `HTTP/2.0`), when it did: an
    /// upstream 4xx that only one protocol gets points at the hop, not the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream_version: Option<&'static str>,
    /// Total time until the response body ended.
    pub(crate) duration_ms: f64,
    /// Time from sending upstream to the response head.
    pub(crate) upstream_ms: Option<f64>,
    /// Error code (`upstream_unreachable`, ...), if the request failed.
    pub(crate) error: Option<String>,
    /// Client address.
    pub(crate) client: String,
    /// The client's UID as the kernel attests it, on listeners that admit only some UIDs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) caller_uid: Option<u32>,
    /// Response body bytes sent to the app (tunnels: bytes from the upstream).
    pub(crate) bytes_out: u64,
    /// Tunnels: bytes from the app.
    pub(crate) bytes_in: Option<u64>,
    /// An upgraded connection (WebSocket): the protocol and the bytes relayed each way after
    /// the 101; the line is written when it closes, so `duration_ms` is the whole conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upgrade: Option<UpgradeLog>,
    /// How the exchange ended.
    pub(crate) completion: Completion,
}

/// The upgrade part of a line (DESIGN §9).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct UpgradeLog {
    /// The protocol switched to, lower-cased without version (`websocket`).
    pub(crate) protocol: String,
    /// Bytes relayed from the app after the switch.
    pub(crate) bytes_in: u64,
    /// Bytes relayed to the app after the switch.
    pub(crate) bytes_out: u64,
}

/// How a request ended (DESIGN §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Completion {
    /// The response (or the refusal, or the tunnel) ran to its end.
    Complete,
    /// The client went away (reset its stream, closed the connection) before a response.
    ClientClosed,
    /// The response body broke off before its end.
    ResponseIncomplete,
    /// The shutdown deadline cut the request.
    Shutdown,
}

impl Completion {
    /// The name in the log line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Completion::Complete => "complete",
            Completion::ClientClosed => "client_closed",
            Completion::ResponseIncomplete => "response_incomplete",
            Completion::Shutdown => "shutdown",
        }
    }
}

impl Record {
    /// A record for a request that just arrived; stages fill in the rest.
    pub(crate) fn new(now: SystemTime) -> Record {
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
            address: None,
            path: String::new(),
            query: None,
            route: None,
            decision: "deny",
            reason: None,
            policy_ids: Vec::new(),
            on_behalf_of: None,
            mcp: None,
            credential: None,
            stripped: Vec::new(),
            strip_mode: "strip",
            body_scan: None,
            status: 0,
            answered_by: None,
            upstream_version: None,
            duration_ms: 0.0,
            upstream_ms: None,
            error: None,
            client: String::new(),
            caller_uid: None,
            bytes_out: 0,
            bytes_in: None,
            upgrade: None,
            completion: Completion::Complete,
        }
    }

    fn pretty(&self) -> String {
        let stripped: Vec<String> = self
            .stripped
            .iter()
            .map(|f| format!("{}@{}#{}", f.kind, esc(&f.location), f.fingerprint))
            .collect();
        format!(
            "{} {} {} {} {}://{}:{}{} route={} purpose={} identity={} stage={} credential={} stripped=[{}] {:.2}ms{}{}{}",
            self.ts,
            self.decision,
            self.status,
            esc(&self.method),
            self.scheme,
            esc(&self.host),
            self.port,
            esc(&self.path),
            esc(self.route.as_deref().unwrap_or("-")),
            esc(&self.purpose),
            esc(&self.identity),
            esc(&self.stage),
            self.credential
                .as_ref()
                .map_or("-".to_string(), |c| format!(
                    "{}:{}",
                    esc(&c.name),
                    esc(&c.id)
                )),
            stripped.join(","),
            self.duration_ms,
            self.reason
                .as_ref()
                .map_or(String::new(), |r| format!(" reason=\"{}\"", esc(r))),
            self.error
                .as_ref()
                .map_or(String::new(), |e| format!(" error=\"{}\"", esc(e))),
            self.upgrade.as_ref().map_or(String::new(), |u| format!(
                " upgrade={} in={} out={}",
                esc(&u.protocol),
                u.bytes_in,
                u.bytes_out
            )),
        )
    }
}

/// A field of a `pretty` line, so that no relayed text (a path, a reason quoting an
/// upstream, a purpose) can start a line of its own or colour the terminal: control
/// characters (C0, DEL, C1), line and paragraph separators and bidirectional overrides are
/// written as `\u{..}`, and `"` and `\` escaped; everything else as it is.
fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || c == '"'
            || c == '\\'
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Longest a line waits in memory before it is written.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// The writer is woken early once this much is pending.
const WAKE_AT_BYTES: usize = 256 * 1024;
/// Beyond this much pending output, new lines are dropped and counted.
pub(crate) const MAX_PENDING_BYTES: usize = 16 * 1024 * 1024;

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Set once the shutdown deadline has passed: a request dropped after that was cut by it.
    past_deadline: AtomicBool,
}

/// Handle to the purpose-log writer; cheap to clone.
#[derive(Clone)]
pub(crate) struct PurposeLog {
    shared: Arc<Shared>,
    format: LogFormat,
    metrics: Arc<Metrics>,
}

/// Stops the writer and waits for it to write everything pending, so nothing is lost at exit.
pub(crate) struct LogWriterGuard {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl LogWriterGuard {
    /// Write what is pending and stop the writer.
    pub(crate) fn finish(mut self) {
        self.shared.pending.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl PurposeLog {
    /// Start the writer.
    pub(crate) fn start(
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
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            past_deadline: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("purpose-log".into())
            .spawn(move || writer(&s2, sink))?;
        Ok((
            PurposeLog {
                shared: shared.clone(),
                format,
                metrics,
            },
            LogWriterGuard {
                shared,
                handle: Some(handle),
            },
        ))
    }

    /// A line for a request that arrived just now; the stages fill it in, and the guard writes
    /// it on whichever path the request ends.
    pub(crate) fn begin(&self) -> LogGuard {
        LogGuard {
            rec: Box::new(Record::new(SystemTime::now())),
            start: Instant::now(),
            log: self.clone(),
            written: false,
            then: None,
        }
    }

    /// Say that the shutdown deadline has passed: requests still running are being cut, and
    /// their lines say `shutdown` rather than `client_closed`.
    pub(crate) fn shutdown_deadline_passed(&self) {
        self.shared.past_deadline.store(true, Ordering::Release);
    }

    /// Count the request and write its line.
    fn finish(&self, rec: &mut Record, start: Instant) {
        let elapsed = start.elapsed();
        rec.duration_ms = ms(elapsed);
        let route = rec.route.clone().unwrap_or_else(|| "none".into());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                decision: rec.decision,
                status: rec.status,
            })
            .inc();
        self.metrics
            .duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
        self.emit(rec);
    }

    /// Write one record: serialized into this thread's line buffer (no allocation once it
    /// has grown to a line's size), then appended to the pending output under the lock.
    pub(crate) fn emit(&self, rec: &Record) {
        let write = |line: &mut Vec<u8>| {
            line.clear();
            match self.format {
                LogFormat::Json => {
                    if serde_json::to_writer(&mut *line, rec).is_err() {
                        line.clear();
                    }
                }
                LogFormat::Pretty => line.extend_from_slice(rec.pretty().as_bytes()),
            }
            line.push(b'\n');
            self.append(line);
        };
        let reused = LINE.try_with(|cell| {
            let Ok(mut line) = cell.try_borrow_mut() else {
                return false;
            };
            write(&mut line);
            if line.capacity() > LINE_KEEP_BYTES {
                *line = Vec::with_capacity(LINE_START_BYTES);
            }
            true
        });
        // A line written as the thread's locals are torn down (a request dropped with its
        // runtime at exit) gets a buffer of its own: every request keeps its line.
        if reused != Ok(true) {
            write(&mut Vec::with_capacity(LINE_START_BYTES));
        }
    }

    fn append(&self, line: &[u8]) {
        let mut p = self.shared.pending.lock();
        if p.buf.len() + line.len() > MAX_PENDING_BYTES {
            drop(p);
            self.metrics.log_dropped.inc();
            return;
        }
        let was_small = p.buf.len() < WAKE_AT_BYTES;
        p.buf.extend_from_slice(line);
        let wake = was_small && p.buf.len() >= WAKE_AT_BYTES;
        drop(p);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

/// A line's buffer starts at this size (a typical line is 600-900 bytes)...
const LINE_START_BYTES: usize = 2048;
/// ...and is let go after a line larger than this (a long path or reason), rather than kept.
const LINE_KEEP_BYTES: usize = 16 * 1024;

thread_local! {
    /// Each thread's line buffer, reused line after line.
    static LINE: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(LINE_START_BYTES));
}

/// Milliseconds with microsecond precision, for the log.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// One request's line in the making: the stages fill the [`Record`] (the guard derefs to it),
/// and the line is written exactly once, by [`LogGuard::finish`] or, on every other exit path,
/// when the guard is dropped: the request's future was dropped because the client reset its
/// stream or went away (`client_closed`), or because the shutdown deadline cut it
/// (`shutdown`). Created on the first line of the pipeline, before anything can fail, so no
/// request (and no token minted for one) goes unlogged.
pub(crate) struct LogGuard {
    rec: Box<Record>,
    start: Instant,
    log: PurposeLog,
    written: bool,
    /// Run once the line is written, on whichever path ends the request (revoking a
    /// per-call token).
    then: Option<Box<dyn FnOnce() + Send>>,
}

impl LogGuard {
    /// When the request arrived.
    pub(crate) fn started(&self) -> Instant {
        self.start
    }

    /// Write the line as the record says the request ended.
    pub(crate) fn finish(mut self) {
        self.write();
    }

    fn write(&mut self) {
        if !std::mem::replace(&mut self.written, true) {
            self.log.finish(&mut self.rec, self.start);
            if let Some(f) = self.then.take() {
                f();
            }
        }
    }

    /// Do `f` when the request is over, however it ends.
    pub(crate) fn then(&mut self, f: impl FnOnce() + Send + 'static) {
        self.then = Some(Box::new(f));
    }
}

impl Deref for LogGuard {
    type Target = Record;
    fn deref(&self) -> &Record {
        &self.rec
    }
}

impl DerefMut for LogGuard {
    fn deref_mut(&mut self) -> &mut Record {
        &mut self.rec
    }
}

impl LogGuard {
    /// How a request that is being dropped unfinished ended: cut by the shutdown deadline, or
    /// left by its client.
    pub(crate) fn abandoned(&self) -> Completion {
        if self.log.shared.past_deadline.load(Ordering::Acquire) {
            Completion::Shutdown
        } else {
            Completion::ClientClosed
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if self.written {
            return;
        }
        // No answer was sent: the line says why, in `error` too (there is no status to read).
        let how = self.abandoned();
        self.rec.completion = how;
        if self.rec.error.is_none() {
            self.rec.error = Some(how.as_str().to_string());
        }
        self.write();
    }
}

fn writer(shared: &Shared, sink: Box<dyn Write + Send>) {
    let mut out = sink;
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut p = shared.pending.lock();
            if !p.closed && p.buf.len() < WAKE_AT_BYTES {
                shared.wake.wait_for(&mut p, FLUSH_EVERY);
            }
            std::mem::swap(&mut p.buf, &mut spare);
            p.closed
        };
        if !spare.is_empty() {
            let _ = out.write_all(&spare);
            let _ = out.flush();
            spare.clear();
        }
        if closed {
            // One more swap: lines emitted between the swap above and `closed` being set.
            let rest = std::mem::take(&mut shared.pending.lock().buf);
            let _ = out.write_all(&rest);
            let _ = out.flush();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reused buffer is a speed-up only: a line written when it cannot be had (taken,
    /// or torn down at thread exit) is written all the same, whole.
    #[test]
    fn a_line_is_written_whole_when_the_threads_buffer_cannot_be_had() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("purpose.jsonl");
        let (log, writer) = PurposeLog::start(
            LogFormat::Json,
            &LogOutput::File(path.clone()),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let mut r = Record::new(SystemTime::now());
        r.request_id = "held-buffer".into();
        LINE.with_borrow_mut(|_held| log.emit(&r));
        r.request_id = "free-buffer".into();
        log.emit(&r);
        writer.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string()
            })
            .collect();
        assert_eq!(ids, [r#""held-buffer""#, r#""free-buffer""#]);
    }

    #[test]
    fn a_pretty_line_stays_one_line_whatever_it_relays() {
        let mut r = Record::new(SystemTime::now());
        r.path = "/x\r\n2026-12-01T00:00:00Z allow 200 GET http://forged".into();
        r.reason = Some("upstream said \u{1b}[31mOK\u{1b}[0m \"quoted\" \\ \u{2028}next".into());
        r.purpose = "p\u{202e}txt.exe".into();
        r.error = Some("a\u{85}b".into());
        let line = r.pretty();
        assert!(
            !line.contains(['\n', '\r', '\u{1b}', '\u{2028}', '\u{202e}', '\u{85}']),
            "{line}"
        );
        assert!(line.contains(r"/x\u{d}\u{a}2026"), "{line}");
        assert!(
            line.contains(
                r#"reason="upstream said \u{1b}[31mOK\u{1b}[0m \"quoted\" \\ \u{2028}next""#
            ),
            "{line}"
        );
        assert!(line.contains(r"purpose=p\u{202e}txt.exe"), "{line}");
        assert_eq!(esc("plain /v1/chat"), "plain /v1/chat");
    }
}

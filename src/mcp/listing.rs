//! `tools/list` answers, filtered to the tools policy could permit this caller to call, so a
//! model is never offered a tool its calls would be refused (DESIGN §10).
//!
//! An MCP server answers a POST with one JSON body or with an SSE stream whose events carry
//! JSON-RPC messages (notifications first, the answer last). Both are rewritten here: a JSON
//! body is read whole (up to a bound) and rewritten once; a stream is rewritten event by
//! event as each completes, so notifications and the answer arrive as they are sent. Only
//! answers to this POST's `tools/list` requests (by id) are touched; other messages pass
//! byte for byte.
//!
//! Fail closed: an answer that cannot be read (too large, not JSON, compressed) is replaced
//! by a JSON-RPC error to each `tools/list` request, never passed on unfiltered.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use serde_json::{Value, json};

use crate::error::BoxError;

/// The largest `tools/list` answer (a JSON body, or one SSE event) read for filtering.
pub(crate) const LIST_MAX_BYTES: usize = 8 * 1024 * 1024;

/// JSON-RPC "internal error", for an answer that could not be filtered.
const INTERNAL_ERROR: i64 = -32603;

/// Whether a tool may be offered: `true` when some call to it could be permitted.
pub(crate) type Offer = Box<dyn FnMut(&str) -> bool + Send>;

/// What filters one POST's `tools/list` answers.
pub(crate) struct Listing {
    /// The ids of the POST's `tools/list` requests.
    ids: Vec<Value>,
    offer: Offer,
    /// Tools left out so far, for the line.
    pub(crate) hidden: Vec<String>,
    /// Tools passed on so far.
    pub(crate) offered: usize,
}

impl Listing {
    /// A filter for the answers to `calls`' `tools/list` requests, or `None` when there are
    /// none (and `offer` is then never built).
    pub(crate) fn for_calls(
        calls: &[super::McpCall],
        offer: impl FnOnce() -> Offer,
    ) -> Option<Listing> {
        let ids: Vec<Value> = calls
            .iter()
            .filter(|c| c.method == "tools/list")
            .filter_map(|c| c.id.clone())
            .collect();
        (!ids.is_empty()).then(|| Listing {
            ids,
            offer: offer(),
            hidden: Vec::new(),
            offered: 0,
        })
    }

    /// Filter the tools of every answer in `v` (a message or a batch) to a listed id;
    /// whether anything changed.
    fn filter(&mut self, v: &mut Value) -> bool {
        match v {
            Value::Array(items) => {
                let mut changed = false;
                for m in items {
                    changed |= self.filter(m);
                }
                changed
            }
            Value::Object(m) => {
                let ours = m.get("id").is_some_and(|id| self.ids.contains(id));
                let Some(Value::Array(tools)) = m
                    .get_mut("result")
                    .and_then(|r| r.get_mut("tools"))
                    .filter(|_| ours)
                else {
                    return false;
                };
                let before = tools.len();
                let mut kept = Vec::with_capacity(before);
                for t in tools.drain(..) {
                    // A tool without a name cannot be called; it is not offered either.
                    match t.get("name").and_then(Value::as_str).map(str::to_owned) {
                        Some(name) if (self.offer)(&name) => kept.push(t),
                        Some(name) => self.hidden.push(name),
                        None => self.hidden.push(String::new()),
                    }
                }
                self.offered += kept.len();
                *tools = kept;
                tools.len() != before
            }
            _ => false,
        }
    }

    /// The JSON-RPC error each listed id gets when its answer cannot be filtered.
    fn refusal(&self, why: &str) -> Value {
        let errors: Vec<Value> = self
            .ids
            .iter()
            .map(|id| {
                json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {
                        "code": INTERNAL_ERROR,
                        "message": format!("chaperone: the tools/list answer was withheld: {why}"),
                    },
                })
            })
            .collect();
        match <[Value; 1]>::try_from(errors) {
            Ok([one]) => one,
            Err(many) => Value::Array(many),
        }
    }
}

/// How the answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `application/json`: read whole, rewritten once.
    Json,
    /// `text/event-stream`: rewritten event by event.
    Sse,
}

impl Framing {
    /// The framing of a response with these headers, or `Err` with why it cannot be read
    /// (an encoding other than identity); `Ok(None)` for a body that carries no messages.
    pub(crate) fn of(headers: &http::HeaderMap) -> Result<Option<Framing>, String> {
        if let Some(enc) = headers.get(http::header::CONTENT_ENCODING)
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            return Err(format!(
                "it is {}-encoded",
                String::from_utf8_lossy(enc.as_bytes())
            ));
        }
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        Ok(match ct.as_str() {
            "application/json" => Some(Framing::Json),
            "text/event-stream" => Some(Framing::Sse),
            _ => None,
        })
    }
}

/// A response body whose `tools/list` answers are filtered on the way through.
pub(crate) struct Filtered<B> {
    inner: B,
    framing: Framing,
    /// The filter; what it hid is read when the line is written.
    pub(crate) listing: Listing,
    /// Bytes read and not yet passed on (a JSON body so far, or an SSE event in progress).
    buf: BytesMut,
    /// The answer could not be filtered: this replaces it, and the body ends.
    withheld: Option<String>,
    /// Nothing more to pass on.
    done: bool,
}

impl<B> Filtered<B> {
    /// Filter `inner`, framed as `framing`; with `withheld`, the answer is replaced by an
    /// error saying why before anything is read.
    pub(crate) fn new(
        inner: B,
        framing: Framing,
        listing: Listing,
        withheld: Option<String>,
    ) -> Self {
        Filtered {
            inner,
            framing,
            listing,
            buf: BytesMut::new(),
            withheld,
            done: false,
        }
    }

    /// The refusal, framed as the answer would have been.
    fn refusal(&mut self, why: &str) -> Bytes {
        self.done = true;
        self.buf.clear();
        let msg = self.listing.refusal(why).to_string();
        match self.framing {
            Framing::Json => Bytes::from(msg),
            Framing::Sse => Bytes::from(format!("event: message\ndata: {msg}\n\n")),
        }
    }

    /// The complete SSE events in the buffer (all of it at `eof`), rewritten.
    fn drain_events(&mut self, eof: bool) -> Bytes {
        let mut out = BytesMut::new();
        loop {
            let end = match event_end(&self.buf, eof) {
                Some(end) => end,
                None if eof && !self.buf.is_empty() => self.buf.len(),
                None => break,
            };
            let event = self.buf.split_to(end).freeze();
            match rewrite_event(&event, &mut self.listing) {
                Some(new) => out.extend_from_slice(new.as_bytes()),
                None => out.extend_from_slice(&event),
            }
        }
        out.freeze()
    }

    /// The whole JSON body, rewritten (or refused when it is not JSON).
    fn rewrite_json(&mut self) -> Bytes {
        let body = std::mem::take(&mut self.buf).freeze();
        match serde_json::from_slice::<Value>(&body) {
            Ok(mut v) => {
                if self.listing.filter(&mut v) {
                    Bytes::from(v.to_string())
                } else {
                    body
                }
            }
            Err(e) => self.refusal(&format!("it is not JSON ({e})")),
        }
    }
}

impl<B> Body for Filtered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(why) = this.withheld.take() {
            return Poll::Ready(Some(Ok(Frame::data(this.refusal(&why)))));
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(f))) => f,
                Poll::Ready(None) => {
                    this.done = true;
                    let out = match this.framing {
                        Framing::Json => this.rewrite_json(),
                        Framing::Sse => this.drain_events(true),
                    };
                    if out.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            };
            let data = match frame.into_data() {
                Ok(d) => d,
                // Trailers: whatever is buffered is over.
                Err(_) => continue,
            };
            this.buf.extend_from_slice(&data);
            if this.buf.len() > LIST_MAX_BYTES {
                let why = format!("it is larger than the {LIST_MAX_BYTES} bytes read to filter it");
                let refused = match this.framing {
                    // The events before the oversize one are passed on first.
                    Framing::Sse => {
                        let before = this.drain_events(false);
                        let mut out = BytesMut::from(&before[..]);
                        out.extend_from_slice(&this.refusal(&why));
                        out.freeze()
                    }
                    Framing::Json => this.refusal(&why),
                };
                return Poll::Ready(Some(Ok(Frame::data(refused))));
            }
            if this.framing == Framing::Sse {
                let out = this.drain_events(false);
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.withheld.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Where the first complete SSE event in `buf` ends (after the blank line that ends it).
/// Lines end in CRLF, LF or CR; a CR as the last byte may be half a CRLF, so it waits for
/// the next byte unless the stream is over.
fn event_end(buf: &[u8], eof: bool) -> Option<usize> {
    let mut line_start = 0;
    let mut i = 0;
    while i < buf.len() {
        let len = match buf[i] {
            b'\n' => 1,
            b'\r' if i + 1 < buf.len() => {
                if buf[i + 1] == b'\n' {
                    2
                } else {
                    1
                }
            }
            b'\r' if eof => 1,
            b'\r' => return None,
            _ => {
                i += 1;
                continue;
            }
        };
        if i == line_start {
            return Some(i + len);
        }
        i += len;
        line_start = i;
    }
    None
}

/// One SSE event with its `data` filtered, or `None` when it is not an answer to filter
/// (it then passes as it came).
fn rewrite_event(event: &[u8], listing: &mut Listing) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Vec<&str> = Vec::new();
    let mut other: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        match line.strip_prefix("data") {
            Some(rest) if rest.is_empty() || rest.starts_with(':') => {
                let v = rest.strip_prefix(':').unwrap_or(rest);
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
            _ => other.push(line),
        }
    }
    if data.is_empty() {
        return None;
    }
    let mut v: Value = serde_json::from_str(&data.join("\n")).ok()?;
    if !listing.filter(&mut v) {
        return None;
    }
    let mut out = String::new();
    for line in other {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&v.to_string());
    out.push_str("\n\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn listing(ids: &[Value]) -> Listing {
        Listing {
            ids: ids.to_vec(),
            offer: Box::new(|name| name != "delete_repository"),
            hidden: Vec::new(),
            offered: 0,
        }
    }

    const ANSWER: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"search_docs","inputSchema":{"type":"object"}},{"name":"delete_repository","inputSchema":{"type":"object"}}]}}"#;

    /// A body sent in these pieces.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl Body for Pieces {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// A body whose pieces arrive when the test sends them.
    struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Chan {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn pieces(parts: &[&str]) -> Pieces {
        Pieces(parts.iter().map(|p| Bytes::from(p.to_string())).collect())
    }

    async fn run(framing: Framing, parts: &[&str], ids: &[Value]) -> (String, Vec<String>) {
        let mut f = Filtered::new(pieces(parts), framing, listing(ids), None);
        let mut out = Vec::new();
        while let Some(frame) = f.frame().await {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        (String::from_utf8(out).unwrap(), f.listing.hidden)
    }

    #[tokio::test]
    async fn json_answers_lose_the_tools_policy_refuses() {
        let (out, hidden) = run(Framing::Json, &[&ANSWER[..40], &ANSWER[40..]], &[json!(1)]).await;
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["result"]["tools"][0]["name"], "search_docs");
        assert_eq!(hidden, vec!["delete_repository"]);
        // An answer to another id (not this POST's tools/list) is left alone.
        let (out, hidden) = run(Framing::Json, &[ANSWER], &[json!(2)]).await;
        assert_eq!(out, ANSWER);
        assert!(hidden.is_empty());
        // Not JSON: withheld, as an error to the request.
        let (out, _) = run(Framing::Json, &["{\"tools\": ["], &[json!(1)]).await;
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["id"], 1);
        assert!(v["error"]["message"].as_str().unwrap().contains("not JSON"));
    }

    #[tokio::test]
    async fn sse_events_are_rewritten_one_by_one_and_others_pass_untouched() {
        let note = "event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\r\n\r\n";
        let answer = format!("id: 7\nevent: message\ndata: {ANSWER}\n\n");
        let stream = format!("{note}{answer}: keep-alive\n\n");
        // Split everywhere, CRLFs included.
        for cut in [1, 17, note.len() - 1, note.len() + 5, stream.len() - 3] {
            let (out, hidden) =
                run(Framing::Sse, &[&stream[..cut], &stream[cut..]], &[json!(1)]).await;
            assert!(out.starts_with(note), "{cut}: {out}");
            assert!(out.contains("id: 7\nevent: message\ndata: {"), "{out}");
            assert!(!out.contains("delete_repository"), "{out}");
            assert!(out.contains("search_docs"), "{out}");
            assert!(out.ends_with(": keep-alive\n\n"), "{out}");
            assert_eq!(hidden, vec!["delete_repository"]);
        }
        // A data field split over two lines is one message.
        let split = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\ndata: \"result\":{\"tools\":[{\"name\":\"delete_repository\"}]}}\n\n";
        let (out, _) = run(Framing::Sse, &[split], &[json!(1)]).await;
        assert_eq!(
            out,
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[]}}\n\n"
        );
    }

    #[tokio::test]
    async fn an_event_is_passed_on_as_soon_as_it_is_complete() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut f = Filtered::new(Chan(rx), Framing::Sse, listing(&[json!(1)]), None);
        tx.send(Bytes::from_static(b"data: {\"progress\":1}\n\n"))
            .await
            .unwrap();
        let first = f.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            &first[..],
            b"data: {\"progress\":1}\n\n",
            "before the stream ends"
        );
        drop(tx);
        assert!(f.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_answer_too_large_or_encoded_is_withheld() {
        let big = "x".repeat(LIST_MAX_BYTES + 1);
        let (out, _) = run(Framing::Sse, &["data: {}\n\n", &big], &[json!(1)]).await;
        assert!(out.starts_with("data: {}\n\n"), "events before it pass");
        assert!(out.contains("\"error\""), "{}", &out[..200.min(out.len())]);
        let mut h = http::HeaderMap::new();
        h.insert("content-encoding", "gzip".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let why = Framing::of(&h).unwrap_err();
        let mut f = Filtered::new(
            pieces(&[ANSWER]),
            Framing::Json,
            listing(&[json!(1)]),
            Some(why),
        );
        let out = f.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&out).contains("gzip-encoded"));
        assert!(f.frame().await.is_none());
        h.remove("content-encoding");
        assert_eq!(Framing::of(&h), Ok(Some(Framing::Json)));
        h.insert(
            "content-type",
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(Framing::of(&h), Ok(Some(Framing::Sse)));
    }

    #[test]
    fn event_ends_by_every_line_ending() {
        assert_eq!(event_end(b"data: x\n\nrest", false), Some(9));
        assert_eq!(event_end(b"data: x\r\n\r\nrest", false), Some(11));
        assert_eq!(event_end(b"data: x\r\rrest", false), Some(9));
        assert_eq!(event_end(b"data: x\r", false), None);
        assert_eq!(event_end(b"data: x\r\r", false), None, "may be half a CRLF");
        assert_eq!(event_end(b"data: x\r\r", true), Some(9));
        assert_eq!(event_end(b"data: x\n", false), None);
    }
}

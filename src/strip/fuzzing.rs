//! The detector's invariants, checked on arbitrary input: by the `cargo fuzz` target
//! (`fuzz/fuzz_targets/detector.rs`) and, on pseudo-random input, by `tests/corpus.rs` so
//! CI exercises them without a nightly toolchain. Panics when an invariant breaks.

use http::{HeaderMap, HeaderValue};

use super::body::{self, BodyKind};
use super::{Hit, find_tokens, inspect, inspect_body};
use crate::fingerprint::Fingerprinter;
use crate::strip::StripMode;

/// Run every entry point of the detector on `data` and check what it returns.
pub fn check(data: &[u8]) {
    let fp = Fingerprinter::new(b"fuzzing-fingerprint-key-0123456789");
    let text = String::from_utf8_lossy(data);

    // Hits lie inside the text, on character boundaries, in order, without overlap.
    let mut hits: Vec<Hit> = Vec::new();
    find_tokens(&text, &mut hits);
    hits.sort_by_key(|h| h.start);
    let mut last_end = 0;
    for h in &hits {
        assert!(h.start < h.end && h.end <= text.len(), "{h:?}");
        assert!(text.is_char_boundary(h.start) && text.is_char_boundary(h.end));
        assert!(h.start >= last_end, "overlapping hits: {hits:?}");
        last_end = h.end;
    }

    // Bodies: no panic; every finding names a body location; a fingerprint never holds the
    // input.
    let multipart = BodyKind::Multipart("fuzz-boundary".into());
    for kind in [BodyKind::Json, BodyKind::Form, multipart.clone()] {
        for f in inspect_body(&fp, &kind, data) {
            assert!(f.finding.location.starts_with("body"));
            assert_eq!(f.finding.fingerprint.len(), 12);
        }
        let Ok(out) = body::inject_field(&kind, data, "api_key", "tok\"en") else {
            continue;
        };
        // Injection keeps a JSON body JSON and a multipart body multipart, and the field
        // then holds the value.
        let mut seen = false;
        match &kind {
            BodyKind::Json => {
                let s = std::str::from_utf8(&out).expect("injected JSON is UTF-8");
                body::walk_json(s, |v| {
                    if v.field == "api_key" {
                        seen |= v.text == Some("tok\"en");
                    }
                })
                .expect("injected JSON still walks");
            }
            BodyKind::Multipart(b) => {
                body::walk_multipart(&out, b, |p| {
                    if p.name == "api_key" {
                        seen |= &out[p.range] == b"tok\"en";
                    }
                })
                .expect("injected multipart still walks");
            }
            BodyKind::Form => seen = true,
        }
        assert!(seen, "the injected field is present");
    }

    // The head: header values, the query and userinfo.
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(data) {
        headers.insert("x-fuzz", v.clone());
        headers.insert("cookie", v.clone());
        headers.insert("authorization", v);
    }
    let q = text.replace(['#', ' '], "");
    let report = inspect(&fp, StripMode::Strip, &mut headers, Some(&q), Some(&text));
    if let Some(nq) = &report.new_path_and_query {
        assert!(nq.len() <= q.len(), "stripping never grows the query");
    }
}

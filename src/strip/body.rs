//! Request bodies: JSON (and NDJSON), HTML-form and multipart/form-data bodies, read in one
//! linear pass.
//!
//! The JSON walker is deliberately not a parser into a tree: it visits each scalar value
//! with the name of the field that holds it (for array elements, the array's field) and its
//! byte range, decoding a string only when it has escapes. That keeps a 1 KiB body in the
//! low microseconds, lets a value be replaced in place with every other byte kept as sent,
//! and bounds the work by the body's length whatever its shape (nesting is capped).

use std::borrow::Cow;
use std::ops::Range;

use http::HeaderMap;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};

/// What `application/x-www-form-urlencoded` leaves as is (the WHATWG URL standard's set).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

/// Deeper nesting than this is not walked (the body is then scanned as plain text).
const MAX_DEPTH: usize = 256;

/// Body formats that are inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`, `application/*+json`, `application/x-ndjson`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// `multipart/form-data` (RFC 7578) with this boundary: form fields and file uploads.
    Multipart(String),
}

/// Why a body is or is not inspected, from its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyPlan {
    /// Inspect it as this kind.
    Inspect(BodyKind),
    /// Not a format that carries fields (or no body): pass it through.
    NotApplicable,
    /// A JSON or form body under a content encoding that is not decoded here.
    Encoded,
}

/// Decide from the request head whether the body is inspected.
pub(crate) fn plan(headers: &HeaderMap) -> BodyPlan {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return BodyPlan::NotApplicable;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let kind = match essence.as_str() {
        "application/x-www-form-urlencoded" => BodyKind::Form,
        // Without a usable boundary no server can read the parts either.
        "multipart/form-data" => match boundary(ct) {
            Some(b) => BodyKind::Multipart(b),
            None => return BodyPlan::NotApplicable,
        },
        "application/json" | "application/x-ndjson" | "application/jsonl" | "text/json" => {
            BodyKind::Json
        }
        e if e.starts_with("application/") && e.ends_with("+json") => BodyKind::Json,
        _ => return BodyPlan::NotApplicable,
    };
    match headers.get(CONTENT_ENCODING).map(|v| v.as_bytes()) {
        None | Some(b"identity") => BodyPlan::Inspect(kind),
        Some(_) => BodyPlan::Encoded,
    }
}

/// The `boundary` parameter of a multipart Content-Type, unquoted; `None` when absent or not
/// 1 to 70 characters without CR or LF (RFC 2046). A boundary never holds `;`, so splitting
/// the parameters on it is safe.
fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|q| q.strip_suffix('"'))
            .unwrap_or(v);
        (!v.is_empty() && v.len() <= 70 && !v.contains(['\r', '\n'])).then(|| v.to_string())
    })
}

/// Decode the contents of a JSON string literal (between the quotes) that has escapes.
fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex = |it: &mut std::str::Chars<'_>| {
                    let s: String = it.by_ref().take(4).collect();
                    u32::from_str_radix(&s, 16).ok()
                };
                let Some(hi) = hex(&mut chars) else {
                    out.push('\u{fffd}');
                    continue;
                };
                let code = if (0xd800..0xdc00).contains(&hi) {
                    let mut look = chars.clone();
                    if look.next() == Some('\\') && look.next() == Some('u') {
                        match hex(&mut look) {
                            Some(lo) if (0xdc00..0xe000).contains(&lo) => {
                                chars = look;
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            }
                            _ => 0xfffd,
                        }
                    } else {
                        0xfffd
                    }
                } else {
                    hi
                };
                out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// One scalar value in a JSON document.
pub(crate) struct JsonValue<'a> {
    /// The innermost field name holding it (`""` at the top level).
    pub(crate) field: &'a str,
    /// Byte range of the literal, quotes included.
    pub(crate) range: Range<usize>,
    /// The decoded text, for strings.
    pub(crate) text: Option<&'a str>,
}

/// The text given as JSON is not JSON (or nests deeper than the walker goes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotJson;

/// Visit every scalar value of a JSON text (or of each document of NDJSON) in order.
/// `Err` when the text is not JSON; values seen before the error were visited.
pub(crate) fn walk_json(s: &str, mut visit: impl FnMut(JsonValue<'_>)) -> Result<(), NotJson> {
    let b = s.as_bytes();
    // One frame per open container: whether it is an object, and the field that holds it
    // (which is the field of an array's elements).
    let mut stack: Vec<(bool, Cow<'_, str>)> = Vec::new();
    let mut key: Cow<'_, str> = Cow::Borrowed("");
    let mut expect_key = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' | b':' => i += 1,
            b'{' | b'[' => {
                if stack.len() >= MAX_DEPTH || expect_key {
                    return Err(NotJson);
                }
                let obj = b[i] == b'{';
                let holder = match stack.last() {
                    Some((false, k)) => k.clone(),
                    _ => std::mem::take(&mut key),
                };
                stack.push((obj, holder));
                expect_key = obj;
                i += 1;
            }
            b'}' | b']' => {
                let (obj, _) = stack.pop().ok_or(NotJson)?;
                if obj != (b[i] == b'}') {
                    return Err(NotJson);
                }
                expect_key = false;
                key = Cow::Borrowed("");
                i += 1;
            }
            b',' => {
                expect_key = matches!(stack.last(), Some((true, _)));
                i += 1;
            }
            b'"' => {
                let (end, escaped) = string_end(b, i).ok_or(NotJson)?;
                let raw = &s[i + 1..end - 1];
                let text: Cow<'_, str> = if escaped {
                    Cow::Owned(unescape(raw))
                } else {
                    Cow::Borrowed(raw)
                };
                if expect_key {
                    key = text;
                    expect_key = false;
                } else {
                    let field = match stack.last() {
                        Some((false, k)) => k.as_ref(),
                        _ => key.as_ref(),
                    };
                    visit(JsonValue {
                        field,
                        range: i..end,
                        text: Some(&text),
                    });
                }
                i = end;
            }
            _ if expect_key => return Err(NotJson),
            // A number, `true`, `false` or `null`; any other byte means this is not JSON.
            c if is_scalar_byte(c) => {
                let start = i;
                while i < b.len() && is_scalar_byte(b[i]) {
                    i += 1;
                }
                let field = match stack.last() {
                    Some((false, k)) => k.as_ref(),
                    _ => key.as_ref(),
                };
                visit(JsonValue {
                    field,
                    range: start..i,
                    text: None,
                });
            }
            _ => return Err(NotJson),
        }
    }
    if stack.is_empty() {
        Ok(())
    } else {
        Err(NotJson)
    }
}

/// Bytes of JSON numbers and of `true`, `false`, `null`.
fn is_scalar_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')
}

/// JSON's whitespace (RFC 8259): narrower than `u8::is_ascii_whitespace`, which takes form feed.
fn is_json_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// The index just past the closing quote of the string starting at `b[start] == '"'`, and
/// whether the string has escapes.
fn string_end(b: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut i = start + 1;
    let mut escaped = false;
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', &b[i..])?;
        if b[at] == b'"' {
            return Some((at + 1, escaped));
        }
        escaped = true;
        i = at + 2;
        if i > b.len() {
            return None;
        }
    }
}

/// One `name=value` pair of a form body: decoded name and value, and the value's byte range.
pub(crate) struct FormPair<'a> {
    /// Decoded name.
    pub(crate) name: Cow<'a, str>,
    /// Decoded value.
    pub(crate) value: Cow<'a, str>,
    /// Byte range of the encoded value.
    pub(crate) range: Range<usize>,
}

fn form_decode(raw: &[u8]) -> Cow<'_, str> {
    if raw.contains(&b'+') {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&c| if c == b'+' { b' ' } else { c })
            .collect();
        Cow::Owned(percent_decode(&spaced).decode_utf8_lossy().into_owned())
    } else {
        percent_decode(raw).decode_utf8_lossy()
    }
}

/// Visit every pair of an `application/x-www-form-urlencoded` body.
pub(crate) fn walk_form(b: &[u8], mut visit: impl FnMut(FormPair<'_>)) {
    let mut start = 0;
    for pair in b.split(|&c| c == b'&') {
        let (name, value, vstart) = match pair.iter().position(|&c| c == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..], start + eq + 1),
            None => (pair, &pair[pair.len()..], start + pair.len()),
        };
        if !pair.is_empty() {
            visit(FormPair {
                name: form_decode(name),
                value: form_decode(value),
                range: vstart..vstart + value.len(),
            });
        }
        start += pair.len() + 1;
    }
}

/// One part of a multipart/form-data body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    /// The form field: the `name` of its Content-Disposition (`""` if none).
    pub(crate) name: String,
    /// The file name, for a file upload.
    pub(crate) filename: Option<String>,
    /// Byte range of the part's content.
    pub(crate) range: Range<usize>,
}

/// A multipart body whose framing is broken (no closing delimiter, a part without the end of
/// its headers): it is then inspected as plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotMultipart;

/// What of a multipart body lies outside its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Framing {
    /// Text before the first delimiter (servers ignore it; it is still sent).
    pub(crate) preamble: Range<usize>,
    /// Where the closing delimiter starts (its leading CRLF, if it has one): where a new part
    /// goes.
    pub(crate) close: usize,
    /// Text after the closing delimiter.
    pub(crate) epilogue: Range<usize>,
}

/// Visit every part of a multipart/form-data body with `boundary`, in order, and return
/// what lies outside them. Linear: each delimiter search starts where the last one ended.
pub(crate) fn walk_multipart(
    body: &[u8],
    boundary: &str,
    mut visit: impl FnMut(Part),
) -> Result<Framing, NotMultipart> {
    use memchr::memmem;
    let delimiter = format!("--{boundary}");
    // A delimiter is only a delimiter at the start of a line (RFC 2046, 5.1.1).
    let line_delimiter = format!("\r\n--{boundary}");
    let next_line = memmem::Finder::new(line_delimiter.as_bytes());
    let mut at = if body.starts_with(delimiter.as_bytes()) {
        0
    } else {
        next_line.find(body).ok_or(NotMultipart)? + 2
    };
    let preamble = 0..at.saturating_sub(2);
    loop {
        let after = at + delimiter.len();
        if body[after..].starts_with(b"--") {
            let close = if at >= 2 && &body[at - 2..at] == b"\r\n" {
                at - 2
            } else {
                at
            };
            return Ok(Framing {
                preamble,
                close,
                epilogue: after + 2..body.len(),
            });
        }
        // Transport padding, then the end of the delimiter line.
        let pad = body[after..]
            .iter()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
        let head_start = after + pad;
        if !body[head_start..].starts_with(b"\r\n") {
            return Err(NotMultipart);
        }
        let head_start = head_start + 2;
        let (head_end, content_start) = if body[head_start..].starts_with(b"\r\n") {
            (head_start, head_start + 2)
        } else {
            let end = memmem::find(&body[head_start..], b"\r\n\r\n").ok_or(NotMultipart)?;
            (head_start + end, head_start + end + 4)
        };
        let content_end =
            content_start + next_line.find(&body[content_start..]).ok_or(NotMultipart)?;
        let (name, filename) = disposition(&body[head_start..head_end]);
        visit(Part {
            name,
            filename,
            range: content_start..content_end,
        });
        at = content_end + 2;
    }
}

/// The `name` and `filename` of a part's Content-Disposition header.
fn disposition(head: &[u8]) -> (String, Option<String>) {
    let head = String::from_utf8_lossy(head);
    for line in head.split("\r\n") {
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-disposition")
        {
            return (param(v, "name").unwrap_or_default(), param(v, "filename"));
        }
    }
    (String::new(), None)
}

/// A parameter of a header value (`form-data; name="a"; filename=b.txt`): a token or a
/// quoted string with backslash escapes. Parameters are matched by their whole name, so
/// `name` never matches `filename`.
fn param(value: &str, want: &str) -> Option<String> {
    let mut rest = value;
    loop {
        rest = &rest[rest.find(';')? + 1..];
        let eq = rest.find('=')?;
        if let Some(semi) = rest[..eq].find(';') {
            // A parameter without a value: go on from the next one.
            rest = &rest[semi..];
            continue;
        }
        let key = rest[..eq].trim();
        let raw = rest[eq + 1..].trim_start();
        let (v, remaining) = match raw.strip_prefix('"') {
            Some(quoted) => {
                let mut out = String::new();
                let mut end = quoted.len();
                let mut chars = quoted.char_indices();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                out.push(n);
                            }
                        }
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => out.push(c),
                    }
                }
                (out, &quoted[end..])
            }
            None => {
                let end = raw.find(';').unwrap_or(raw.len());
                (raw[..end].trim().to_string(), &raw[end..])
            }
        };
        if key.eq_ignore_ascii_case(want) {
            return Some(v);
        }
        rest = remaining;
    }
}

/// Put `value` into every value of field `field` in a JSON, form or multipart body; when
/// the body has none (at any depth), add it: to a JSON body's top-level object, as a new
/// form pair, or as a new part before the closing delimiter. `Err` with a reason when the
/// body cannot carry the field (not a JSON object, broken multipart framing).
pub(crate) fn inject_field(
    kind: &BodyKind,
    body: &[u8],
    field: &str,
    value: &str,
) -> Result<Vec<u8>, String> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let replacement: String;
    match kind {
        BodyKind::Json => {
            let text =
                std::str::from_utf8(body).map_err(|_| "the JSON body is not UTF-8".to_string())?;
            walk_json(text, |v| {
                if v.field == field {
                    ranges.push(v.range);
                }
            })
            .map_err(|NotJson| "the body is not valid JSON".to_string())?;
            replacement = json_string(value);
            if ranges.is_empty() {
                let open = body
                    .iter()
                    .position(|&c| !is_json_space(c))
                    .filter(|&p| body[p] == b'{')
                    .ok_or_else(|| "the JSON body is not an object".to_string())?;
                let empty = body[open + 1..].iter().find(|&&c| !is_json_space(c)) == Some(&b'}');
                let add = format!(
                    "{}:{}{}",
                    json_string(field),
                    replacement,
                    if empty { "" } else { "," }
                );
                let mut out = Vec::with_capacity(body.len() + add.len());
                out.extend_from_slice(&body[..=open]);
                out.extend_from_slice(add.as_bytes());
                out.extend_from_slice(&body[open + 1..]);
                return Ok(out);
            }
        }
        BodyKind::Form => {
            walk_form(body, |p| {
                if p.name == field {
                    ranges.push(p.range);
                }
            });
            replacement = utf8_percent_encode(value, FORM).to_string();
            if ranges.is_empty() {
                let mut out = body.to_vec();
                if !out.is_empty() {
                    out.push(b'&');
                }
                out.extend_from_slice(utf8_percent_encode(field, FORM).to_string().as_bytes());
                out.push(b'=');
                out.extend_from_slice(replacement.as_bytes());
                return Ok(out);
            }
        }
        BodyKind::Multipart(boundary) => {
            if value.contains(['\r', '\n']) {
                return Err(
                    "the value cannot go into a multipart part (it holds a line break)".into(),
                );
            }
            let close = walk_multipart(body, boundary, |p| {
                if p.name == field {
                    ranges.push(p.range);
                }
            })
            .map_err(|NotMultipart| "the multipart body is malformed".to_string())?
            .close;
            replacement = value.to_string();
            if ranges.is_empty() {
                let part = format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{value}",
                    field.replace('"', "%22")
                );
                // After the last part's CRLF, or first in a body that has no parts.
                let add = if body[close..].starts_with(b"\r\n") {
                    format!("\r\n{part}")
                } else {
                    format!("{part}\r\n")
                };
                let mut out = Vec::with_capacity(body.len() + add.len());
                out.extend_from_slice(&body[..close]);
                out.extend_from_slice(add.as_bytes());
                out.extend_from_slice(&body[close..]);
                return Ok(out);
            }
        }
    }
    Ok(splice(body, &ranges, replacement.as_bytes()))
}

/// `body` with each of the ordered, disjoint `ranges` replaced by `with`.
pub(crate) fn splice(body: &[u8], ranges: &[Range<usize>], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + ranges.len() * with.len());
    let mut at = 0;
    for r in ranges {
        out.extend_from_slice(&body[at..r.start]);
        out.extend_from_slice(with);
        at = r.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// A JSON string literal for `s`.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(s: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        walk_json(s, |v| {
            out.push((
                v.field.to_string(),
                v.text
                    .map_or_else(|| s[v.range.clone()].to_string(), str::to_string),
            ));
        })
        .unwrap();
        out
    }

    #[test]
    fn json_fields_arrays_and_escapes() {
        let v = values(
            r#"{"a": "x", "n": 1, "list": ["p", {"k": "q\u00e9\n"}, true], "o": {"z": null}, "s": "\ud83d\ude00"}"#,
        );
        assert_eq!(
            v,
            [
                ("a", "x"),
                ("n", "1"),
                ("list", "p"),
                ("k", "qé\n"),
                ("list", "true"),
                ("z", "null"),
                ("s", "😀"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // NDJSON: documents one after another.
        assert_eq!(values("{\"a\":\"1\"}\n{\"a\":\"2\"}\n").len(), 2);
        // The last one was found by the fuzzer: form feed is not JSON whitespace, and stray
        // bytes are not a scalar.
        for bad in [
            "{\"a\" 1",
            "{\"a\":\"x}",
            "[1}",
            "{1:2}",
            "]",
            "\u{c}\u{c}{{.&&&;\u{c}",
            "@",
        ] {
            assert!(walk_json(bad, |_| {}).is_err(), "{bad}");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(walk_json(&deep, |_| {}).is_err());
    }

    #[test]
    fn injects_into_json_and_form() {
        let out = |r: Result<Vec<u8>, String>| String::from_utf8(r.unwrap()).unwrap();
        assert_eq!(
            out(inject_field(
                &BodyKind::Json,
                br#"{"model":"m","api_key":"sk-old","nested":{"api_key":null}}"#,
                "api_key",
                "tok\"1"
            )),
            r#"{"model":"m","api_key":"tok\"1","nested":{"api_key":"tok\"1"}}"#
        );
        assert_eq!(
            out(inject_field(
                &BodyKind::Json,
                b" { \"a\": 1 }",
                "api_key",
                "t"
            )),
            r#" {"api_key":"t", "a": 1 }"#
        );
        assert_eq!(
            out(inject_field(&BodyKind::Json, b"{}", "api_key", "t")),
            r#"{"api_key":"t"}"#
        );
        assert!(inject_field(&BodyKind::Json, b"[1]", "api_key", "t").is_err());
        assert!(inject_field(&BodyKind::Json, b"\x0c{\"a\":1}", "api_key", "t").is_err());
        assert_eq!(
            out(inject_field(
                &BodyKind::Form,
                b"a=1&api_key=old+value&b=2",
                "api_key",
                "t/+="
            )),
            "a=1&api_key=t%2F%2B%3D&b=2"
        );
        assert_eq!(
            out(inject_field(&BodyKind::Form, b"a=1", "api_key", "t")),
            "a=1&api_key=t"
        );
    }

    #[test]
    fn plans_by_content_type() {
        let mut h = HeaderMap::new();
        assert_eq!(plan(&h), BodyPlan::NotApplicable);
        h.insert(
            CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(plan(&h), BodyPlan::Inspect(BodyKind::Json));
        h.insert(CONTENT_TYPE, "application/vnd.api+json".parse().unwrap());
        assert_eq!(plan(&h), BodyPlan::Inspect(BodyKind::Json));
        h.insert(
            CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        assert_eq!(plan(&h), BodyPlan::Inspect(BodyKind::Form));
        h.insert(CONTENT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(plan(&h), BodyPlan::Encoded);
        h.insert(CONTENT_TYPE, "image/png".parse().unwrap());
        assert_eq!(plan(&h), BodyPlan::NotApplicable);
    }

    #[test]
    fn multipart_plan_needs_a_boundary() {
        let mut h = HeaderMap::new();
        let kind = |h: &HeaderMap| plan(h);
        h.insert(
            CONTENT_TYPE,
            "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            kind(&h),
            BodyPlan::Inspect(BodyKind::Multipart(
                "----WebKitFormBoundary7MA4YWxkTrZu0gW".into()
            ))
        );
        h.insert(
            CONTENT_TYPE,
            "Multipart/Form-Data; charset=utf-8; BOUNDARY=\"a b=c\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            kind(&h),
            BodyPlan::Inspect(BodyKind::Multipart("a b=c".into()))
        );
        h.insert(CONTENT_TYPE, "multipart/form-data".parse().unwrap());
        assert_eq!(kind(&h), BodyPlan::NotApplicable);
        let long = format!("multipart/form-data; boundary={}", "x".repeat(71));
        h.insert(CONTENT_TYPE, long.parse().unwrap());
        assert_eq!(kind(&h), BodyPlan::NotApplicable);
    }

    /// A body as Python requests and curl send it, with a preamble and an epilogue.
    const MULTIPART: &[u8] = b"preamble, ignored\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"a;b \\\"x\\\".env\"\r\nContent-Type: application/octet-stream\r\n\r\nKEY=1\r\n--XyZ--\r\nepilogue\r\n";

    #[test]
    fn multipart_parts_have_their_names_files_and_ranges() {
        let mut parts = Vec::new();
        let framing = walk_multipart(MULTIPART, "XyZ", |p| parts.push(p)).unwrap();
        let close = framing.close;
        assert_eq!(&MULTIPART[framing.preamble], b"preamble, ignored");
        assert_eq!(&MULTIPART[framing.epilogue], b"\r\nepilogue\r\n");
        let text = |p: &Part| std::str::from_utf8(&MULTIPART[p.range.clone()]).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), text(&parts[0])),
            ("model", "whisper-1")
        );
        assert_eq!(parts[0].filename, None);
        assert_eq!((parts[1].name.as_str(), text(&parts[1])), ("file", "KEY=1"));
        assert_eq!(parts[1].filename.as_deref(), Some("a;b \"x\".env"));
        assert!(MULTIPART[close..].starts_with(b"\r\n--XyZ--"));

        // An empty part, a part without headers, and a body with no parts at all.
        let odd = b"--b\r\nContent-Disposition: form-data; flag; name=e\r\n\r\n\r\n--b\r\n\r\nraw\r\n--b--";
        let mut parts = Vec::new();
        walk_multipart(odd, "b", |p| parts.push(p)).unwrap();
        assert_eq!(parts[0].name, "e");
        assert!(parts[0].range.is_empty());
        assert_eq!(
            (parts[1].name.as_str(), &odd[parts[1].range.clone()]),
            ("", &b"raw"[..])
        );
        let empty = walk_multipart(b"--b--\r\n", "b", |_| {}).unwrap();
        assert_eq!((empty.preamble, empty.close), (0..0, 0));
        // A delimiter not at the start of a line is not one: that text is preamble.
        let late = b"x--b\r\n\r\nv\r\n--b--";
        let mut n = 0;
        let framing = walk_multipart(late, "b", |_| n += 1).unwrap();
        assert_eq!((n, &late[framing.preamble]), (0, &b"x--b\r\n\r\nv"[..]));

        // Broken framing: no closing delimiter, headers that never end, LF-only lines.
        for bad in [
            &b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nvalue"[..],
            b"--b\r\nContent-Disposition: form-data; name=a",
            b"--b\nContent-Disposition: form-data; name=a\n\nv\n--b--",
        ] {
            assert_eq!(
                walk_multipart(bad, "b", |_| {}),
                Err(NotMultipart),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn multipart_injection_replaces_the_field_or_adds_a_part() {
        let kind = BodyKind::Multipart("XyZ".into());
        let out = inject_field(&kind, MULTIPART, "model", "tok").unwrap();
        let expected = String::from_utf8_lossy(MULTIPART).replace("whisper-1", "tok");
        assert_eq!(String::from_utf8(out).unwrap(), expected);

        let out = inject_field(&kind, MULTIPART, "api_key", "tok").unwrap();
        let mut parts = Vec::new();
        walk_multipart(&out, "XyZ", |p| parts.push(p)).unwrap();
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["model", "file", "api_key"]);
        assert_eq!(&out[parts[2].range.clone()], b"tok");
        assert!(out.ends_with(b"\r\n--XyZ--\r\nepilogue\r\n"));

        let out = inject_field(&kind, b"--XyZ--\r\n", "api_key", "tok").unwrap();
        assert_eq!(
            out,
            b"--XyZ\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\ntok\r\n--XyZ--\r\n"
        );
        assert!(inject_field(&kind, MULTIPART, "model", "a\r\n--XyZ--").is_err());
        assert!(inject_field(&kind, b"not multipart", "model", "t").is_err());
    }
}

//! Request bodies: JSON (and NDJSON) and HTML-form bodies, read in one linear pass.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json`, `application/*+json`, `application/x-ndjson`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

/// Why a body is or is not inspected, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// Inspect it as this kind.
    Inspect(BodyKind),
    /// Not a format that carries fields (or no body): pass it through.
    NotApplicable,
    /// A JSON or form body under a content encoding that is not decoded here.
    Encoded,
}

/// Decide from the request head whether the body is inspected.
pub fn plan(headers: &HeaderMap) -> BodyPlan {
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
pub struct JsonValue<'a> {
    /// The innermost field name holding it (`""` at the top level).
    pub field: &'a str,
    /// Byte range of the literal, quotes included.
    pub range: Range<usize>,
    /// The decoded text, for strings.
    pub text: Option<&'a str>,
}

/// The text given as JSON is not JSON (or nests deeper than the walker goes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotJson;

/// Visit every scalar value of a JSON text (or of each document of NDJSON) in order.
/// `Err` when the text is not JSON; values seen before the error were visited.
pub fn walk_json(s: &str, mut visit: impl FnMut(JsonValue<'_>)) -> Result<(), NotJson> {
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
pub struct FormPair<'a> {
    /// Decoded name.
    pub name: Cow<'a, str>,
    /// Decoded value.
    pub value: Cow<'a, str>,
    /// Byte range of the encoded value.
    pub range: Range<usize>,
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
pub fn walk_form(b: &[u8], mut visit: impl FnMut(FormPair<'_>)) {
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

/// Put `value` into every value of field `field` in a JSON or form body; when the body has
/// none (at any depth), add it: to a JSON body's top-level object, or as a new form pair.
/// `Err` with a reason when the body cannot carry the field (not a JSON object).
pub fn inject_field(
    kind: BodyKind,
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
    }
    Ok(splice(body, &ranges, replacement.as_bytes()))
}

/// `body` with each of the ordered, disjoint `ranges` replaced by `with`.
pub fn splice(body: &[u8], ranges: &[Range<usize>], with: &[u8]) -> Vec<u8> {
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
                BodyKind::Json,
                br#"{"model":"m","api_key":"sk-old","nested":{"api_key":null}}"#,
                "api_key",
                "tok\"1"
            )),
            r#"{"model":"m","api_key":"tok\"1","nested":{"api_key":"tok\"1"}}"#
        );
        assert_eq!(
            out(inject_field(
                BodyKind::Json,
                b" { \"a\": 1 }",
                "api_key",
                "t"
            )),
            r#" {"api_key":"t", "a": 1 }"#
        );
        assert_eq!(
            out(inject_field(BodyKind::Json, b"{}", "api_key", "t")),
            r#"{"api_key":"t"}"#
        );
        assert!(inject_field(BodyKind::Json, b"[1]", "api_key", "t").is_err());
        assert!(inject_field(BodyKind::Json, b"\x0c{\"a\":1}", "api_key", "t").is_err());
        assert_eq!(
            out(inject_field(
                BodyKind::Form,
                b"a=1&api_key=old+value&b=2",
                "api_key",
                "t/+="
            )),
            "a=1&api_key=t%2F%2B%3D&b=2"
        );
        assert_eq!(
            out(inject_field(BodyKind::Form, b"a=1", "api_key", "t")),
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
}

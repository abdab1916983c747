//! `chaperone scan FILE`: run the strip stage's detector over recorded requests (a HAR file
//! from a browser or proxy, or JSON lines) and report what `strip` would remove, so a team
//! sees its hard-coded keys before it turns `strip` on. Nothing is sent anywhere.
//!
//! JSON lines: one request per line, `{"method": "POST", "url": "https://...", "headers":
//! {"name": "value"} or [["name", "value"]], "body": "..."}`.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use serde_json::Value;

use super::Exit;
use crate::fingerprint::Fingerprinter;
use crate::strip::StripMode;
use crate::strip::{self, BodyPlan, Finding};

/// One recorded request.
#[derive(Debug, Default)]
pub(crate) struct Recorded {
    /// Method.
    pub(crate) method: String,
    /// Full URL as recorded.
    pub(crate) url: String,
    /// Headers.
    pub(crate) headers: Vec<(String, String)>,
    /// Body text, if any.
    pub(crate) body: Option<String>,
}

/// What the detector found in one request.
#[derive(Debug, Serialize)]
pub(crate) struct Scanned {
    /// 1-based position in the file (entry for HAR, line for JSON lines).
    pub(crate) request: usize,
    /// Method.
    pub(crate) method: String,
    /// URL with query values redacted and userinfo removed.
    pub(crate) url: String,
    /// Secrets found, as the purpose log would list them.
    pub(crate) findings: Vec<Finding>,
    /// Headers that could not be read (invalid names or values), skipped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) skipped: Vec<String>,
}

/// Read a HAR document or JSON lines. Errors name the entry or line.
pub(crate) fn parse(text: &str) -> Result<Vec<(usize, Recorded)>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{')
        && let Ok(doc) = serde_json::from_str::<Value>(trimmed)
        && doc.get("log").is_some()
    {
        return parse_har(&doc);
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        out.push((
            i + 1,
            from_json_line(&v).map_err(|e| format!("line {}: {e}", i + 1))?,
        ));
    }
    Ok(out)
}

fn parse_har(doc: &Value) -> Result<Vec<(usize, Recorded)>, String> {
    let entries = doc["log"]["entries"]
        .as_array()
        .ok_or("HAR: `log.entries` is not a list")?;
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let at = |what: &str| format!("HAR entry {}: {what}", i + 1);
        let req = &e["request"];
        let mut r = Recorded {
            method: req["method"]
                .as_str()
                .ok_or_else(|| at("no request.method"))?
                .to_string(),
            url: req["url"]
                .as_str()
                .ok_or_else(|| at("no request.url"))?
                .to_string(),
            ..Recorded::default()
        };
        for h in req["headers"].as_array().into_iter().flatten() {
            if let (Some(n), Some(v)) = (h["name"].as_str(), h["value"].as_str()) {
                // HTTP/2 pseudo-headers (`:authority`) are not headers of the request.
                if !n.starts_with(':') {
                    r.headers.push((n.to_string(), v.to_string()));
                }
            }
        }
        let post = &req["postData"];
        if let Some(t) = post["text"].as_str() {
            r.body = Some(t.to_string());
        } else if let Some(params) = post["params"].as_array() {
            let pairs: Vec<String> = params
                .iter()
                .filter_map(|p| {
                    // HAR keeps params decoded; encode them back into a form body.
                    let enc = |s: &str| {
                        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                            .to_string()
                    };
                    Some(format!(
                        "{}={}",
                        enc(p["name"].as_str()?),
                        enc(p["value"].as_str()?)
                    ))
                })
                .collect();
            r.body = Some(pairs.join("&"));
        }
        if let Some(mime) = post["mimeType"].as_str()
            && !r
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            r.headers.push(("content-type".into(), mime.to_string()));
        }
        out.push((i + 1, r));
    }
    Ok(out)
}

fn from_json_line(v: &Value) -> Result<Recorded, String> {
    let mut r = Recorded {
        method: v["method"].as_str().unwrap_or("GET").to_string(),
        url: v["url"].as_str().ok_or("no `url`")?.to_string(),
        body: match &v["body"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        },
        ..Recorded::default()
    };
    match &v["headers"] {
        Value::Object(m) => {
            for (k, val) in m {
                r.headers.push((
                    k.clone(),
                    val.as_str().ok_or("a header value is not a string")?.into(),
                ));
            }
        }
        Value::Array(a) => {
            for pair in a {
                match (pair[0].as_str(), pair[1].as_str()) {
                    (Some(k), Some(val)) => r.headers.push((k.into(), val.into())),
                    _ => return Err("`headers` pairs are [name, value] strings".into()),
                }
            }
        }
        Value::Null => {}
        _ => return Err("`headers` is an object or a list of pairs".into()),
    }
    if matches!(v["body"], Value::Object(_) | Value::Array(_))
        && !r
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        r.headers
            .push(("content-type".into(), "application/json".into()));
    }
    Ok(r)
}

/// Split a URL into (display form without userinfo and with query values redacted,
/// query, userinfo).
fn split_url(url: &str) -> (String, Option<&str>, Option<&str>) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q.split('#').next().unwrap_or(q))),
        None => (rest.split('#').next().unwrap_or(rest), None),
    };
    let (authority, path) = before_query
        .find('/')
        .map_or((before_query, ""), |i| before_query.split_at(i));
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut shown = if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    };
    if let Some(q) = query {
        shown.push('?');
        shown.push_str(&strip::redact_query(q));
    }
    (shown, query, userinfo)
}

/// Inspect one recorded request as the strip stage would (in report mode: nothing changes).
pub(crate) fn scan_one(fp: &Fingerprinter, index: usize, r: &Recorded) -> Scanned {
    let mut headers = HeaderMap::new();
    let mut skipped = Vec::new();
    for (n, v) in &r.headers {
        match (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => skipped.push(n.clone()),
        }
    }
    let (url, query, userinfo) = split_url(&r.url);
    let mut findings =
        strip::inspect(fp, StripMode::Report, &mut headers, query, userinfo).findings;
    if let (Some(body), BodyPlan::Inspect(kind)) = (&r.body, strip::body::plan(&headers)) {
        findings.extend(
            strip::inspect_body(fp, &kind, body.as_bytes())
                .into_iter()
                .map(|f| f.finding),
        );
    }
    Scanned {
        request: index,
        method: r.method.clone(),
        url,
        findings,
        skipped,
    }
}

/// Scan a whole file's text; the human-readable report and whether anything was found.
pub(crate) fn report(fp: &Fingerprinter, text: &str, json: bool) -> Result<(String, bool), String> {
    let requests = parse(text)?;
    let scanned: Vec<Scanned> = requests.iter().map(|(i, r)| scan_one(fp, *i, r)).collect();
    let mut out = String::new();
    let mut totals: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut with = 0;
    for s in &scanned {
        if json {
            out.push_str(&serde_json::to_string(s).expect("serializable"));
            out.push('\n');
        }
        if !s.findings.is_empty() {
            with += 1;
        }
        if !json && (!s.findings.is_empty() || !s.skipped.is_empty()) {
            out.push_str(&format!("request {}: {} {}\n", s.request, s.method, s.url));
            for f in &s.findings {
                out.push_str(&format!(
                    "  {:<28} {:<32} fingerprint {}\n",
                    f.kind, f.location, f.fingerprint
                ));
            }
            for h in &s.skipped {
                out.push_str(&format!("  (header `{h}` skipped: not a valid header)\n"));
            }
        }
        for f in &s.findings {
            *totals.entry((f.kind, f.place())).or_default() += 1;
        }
    }
    if !json {
        let n: usize = totals.values().sum();
        out.push_str(&format!(
            "{n} embedded secret(s) in {with} of {} request(s){}\n",
            scanned.len(),
            if n > 0 {
                "; `strip` would remove them (or refuse the request, for bodies)"
            } else {
                ""
            }
        ));
        for ((kind, place), count) in &totals {
            out.push_str(&format!("  {kind:<28} {place:<10} {count}\n"));
        }
    }
    Ok((out, with > 0))
}

/// `chaperone scan FILE`: 0 no secret found, 1 found, 2 error.
pub(crate) fn command(
    file: &std::path::Path,
    json: bool,
    config: Option<&std::path::Path>,
) -> Exit {
    let key_file = match config.map(crate::config::Config::load).transpose() {
        Ok(cfg) => cfg.and_then(|c| c.strip.fingerprint_key_file),
        Err(errs) => {
            super::print_config_errors(&errs);
            return Exit::Error;
        }
    };
    let fp = match Fingerprinter::from_file_or_random(key_file.as_deref()) {
        Ok(fp) => fp,
        Err(e) => {
            eprintln!("chaperone scan: fingerprint key: {e}");
            return Exit::Error;
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
            return Exit::Error;
        }
    };
    match report(&fp, &text, json) {
        Ok((out, found)) => {
            print!("{out}");
            if found { Exit::Finding } else { Exit::Ok }
        }
        Err(e) => {
            eprintln!("chaperone scan: {}: {e}", file.display());
            Exit::Error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_and_shown_without_secrets() {
        let (shown, q, u) = split_url("https://bob:pw@api.test:8443/v1/x?key=abc&n=1#frag");
        assert_eq!(
            shown,
            "https://api.test:8443/v1/x?key=<redacted>&n=<redacted>"
        );
        assert_eq!(q, Some("key=abc&n=1"));
        assert_eq!(u, Some("bob:pw"));
        let (shown, q, u) = split_url("http://h/");
        assert_eq!((shown.as_str(), q, u), ("http://h/", None, None));
    }

    #[test]
    fn json_lines_errors_name_the_line() {
        let e = parse("{\"url\": \"http://a/\"}\n\nnot json\n").unwrap_err();
        assert!(e.starts_with("line 3: not JSON"), "{e}");
        let e = parse("{\"method\": \"GET\"}").unwrap_err();
        assert_eq!(e, "line 1: no `url`");
    }
}

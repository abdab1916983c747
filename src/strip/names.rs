//! Credentials known by where they are, not by their shape: a value under a credential-named
//! field (`api_key`, `client_secret`, `password`, `aws_secret_access_key`, ...) that looks
//! random enough to be a key.
//!
//! Names are split into words (`clientSecret`, `client-secret` and `CLIENT_SECRET` are all
//! `client secret`) and judged by their last word, so `max_tokens`, `token_count`,
//! `api_key_name` and `tokenizer` are not credential names while `refresh_token` is.

use super::formats::is_placeholder;

/// Words that, as the last word of a name, make it a credential name on their own. The
/// lookup in [`could_end_a_credential_name`] is written out by length and first letter for
/// speed; this list is what it must cover, and its test checks that it does.
#[cfg(test)]
const LAST_WORDS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "pwd",
    "passphrase",
    "apikey",
    "credential",
    "credentials",
    "auth",
    "authorization",
    "pat",
];

/// Words before a last word `key` that make it a credential name (`api key`, `secret key`);
/// a bare `key` is too common (object keys, cache keys) to mean a credential in a body.
const KEY_QUALIFIERS: &[&str] = &[
    "api",
    "access",
    "secret",
    "private",
    "account",
    "subscription",
    "signing",
    "master",
    "app",
    "client",
    "consumer",
    "encryption",
    "license",
    "service",
    "admin",
    "auth",
    "session",
];

/// Words anywhere in a name that mean the value is not a credential: pagination cursors,
/// CSRF tokens, counts, identifiers and public halves.
const NOT_CREDENTIAL: &[&str] = &[
    "page",
    "next",
    "continuation",
    "cursor",
    "pagination",
    "sync",
    "csrf",
    "xsrf",
    "max",
    "min",
    "public",
    "publishable",
    "idempotency",
    "verification",
    "hint",
    "cancel",
];

/// The words of a field name as byte ranges: split at non-alphanumerics and camelCase humps.
/// At most 16 words are kept (the last ones); no allocation.
fn words(name: &[u8]) -> ([(u8, u8); 16], usize) {
    let mut out = [(0u8, 0u8); 16];
    let mut n = 0;
    let mut push = |s: usize, e: usize| {
        if e > s {
            if n == out.len() {
                out.copy_within(1.., 0);
                n -= 1;
            }
            // Names are at most 64 bytes (checked by the caller), so offsets fit in a u8.
            out[n] = (s as u8, e as u8);
            n += 1;
        }
    };
    let mut start = 0;
    let mut prev_lower = false;
    for (i, &c) in name.iter().enumerate() {
        if !c.is_ascii_alphanumeric() {
            push(start, i);
            start = i + 1;
            prev_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && prev_lower {
            push(start, i);
            start = i;
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
    }
    push(start, name.len());
    (out, n)
}

/// Whether `word` is `key` or one of the last words of credential names (`token`, `secret`,
/// `password`, `apikey`, `auth`, ...), any case: chosen by length and first
/// letter, so most words are ruled out without comparing bytes.
fn could_end_a_credential_name(word: &[u8]) -> bool {
    let candidates: &[&str] = match (word.len(), word.first().map(|c| c | 0x20)) {
        (3, Some(b'k')) => &["key"],
        (3, Some(b'p')) => &["pwd", "pat"],
        (4, Some(b'a')) => &["auth"],
        (5, Some(b't')) => &["token"],
        (6, Some(b's')) => &["secret"],
        (6, Some(b'p')) => &["passwd"],
        (6, Some(b'a')) => &["apikey"],
        (8, Some(b'p')) => &["password"],
        (10, Some(b'p')) => &["passphrase"],
        (10, Some(b'c')) => &["credential"],
        (11, Some(b'c')) => &["credentials"],
        (13, Some(b'a')) => &["authorization"],
        _ => return false,
    };
    one_of(word, candidates)
}

/// Whether `word` (any case) is one of `list` (lowercase).
fn one_of(word: &[u8], list: &[&str]) -> bool {
    list.iter().any(|w| w.as_bytes().eq_ignore_ascii_case(word))
}

/// What a credential-named field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameKind {
    /// A password: people choose them, so a lower bar than for keys.
    Password,
    /// An AWS secret access key (`aws_secret_access_key`, `SecretAccessKey`).
    AwsSecret,
    /// Any other key, token or secret.
    Secret,
}

/// Whether a field name names a credential.
pub(crate) fn credential_name(name: &str) -> Option<NameKind> {
    if name.len() > 64 || name.is_empty() {
        return None;
    }
    let b = name.as_bytes();
    // The last word first, without splitting the rest: it rules out almost every name
    // (`user-agent`, `content`, `model`), and this runs for every value inspected.
    let end = b.iter().rposition(u8::is_ascii_alphanumeric)? + 1;
    let mut start = end - 1;
    while start > 0
        && b[start - 1].is_ascii_alphanumeric()
        && (!b[start].is_ascii_uppercase() || b[start - 1].is_ascii_uppercase())
    {
        start -= 1;
    }
    if !could_end_a_credential_name(&b[start..end]) {
        return None;
    }
    let (ranges, n) = words(b);
    let w = |i: usize| &b[usize::from(ranges[i].0)..usize::from(ranges[i].1)];
    if n == 0 {
        return None;
    }
    let last = w(n - 1);
    let is_key = last.eq_ignore_ascii_case(b"key");
    if (0..n).any(|i| one_of(w(i), NOT_CREDENTIAL)) {
        return None;
    }
    if is_key {
        let q = w(n.checked_sub(2)?);
        if q.eq_ignore_ascii_case(b"access") && (0..n).any(|i| w(i).eq_ignore_ascii_case(b"secret"))
        {
            return Some(NameKind::AwsSecret);
        }
        return one_of(q, KEY_QUALIFIERS).then_some(NameKind::Secret);
    }
    Some(
        if one_of(last, &["password", "passwd", "pwd", "passphrase"]) {
            NameKind::Password
        } else {
            NameKind::Secret
        },
    )
}

/// Shannon entropy of `v` in bits per byte.
pub(crate) fn entropy(v: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in v {
        counts[usize::from(b)] += 1;
    }
    let n = v.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// The credential type of `value` held in a field named `name`, when the name is a credential
/// name and the value looks like a secret rather than a description, an enum or a template.
pub(crate) fn named_value(name: &str, value: &str) -> Option<&'static str> {
    let kind = credential_name(name)?;
    let v = value.trim();
    if is_placeholder(v)
        || v.len() > 4096
        || v.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        || v.contains("://")
        || v.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let b = v.as_bytes();
    let mixed = super::formats::classes(b) >= 2;
    match kind {
        NameKind::AwsSecret
            if b.len() == 40
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/') =>
        {
            Some("aws_secret_access_key")
        }
        NameKind::Password => (b.len() >= 8 && mixed && entropy(b) >= 2.5).then_some("password"),
        NameKind::AwsSecret | NameKind::Secret => {
            (b.len() >= 16 && mixed && entropy(b) >= 3.0).then_some("credential_field")
        }
    }
}

/// Bytes of a field name inside free text.
fn is_name(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')
}

/// Bytes that end a value inside free text.
fn ends_value(c: u8) -> bool {
    c.is_ascii_whitespace()
        || matches!(
            c,
            b'"' | b'\'' | b',' | b';' | b'&' | b'<' | b'>' | b'}' | b'`'
        )
}

/// Credential assignments inside free text: `OPENAI_API_KEY=...` in a pasted `.env` file,
/// `"client_secret": "..."` in a JSON document embedded in a string, `password: ...` in YAML.
/// Values that overlap a hit already in `hits` are skipped; new ones are appended. Each byte
/// is looked at a bounded number of times: a value is scanned once, then the search resumes
/// after it.
pub(crate) fn find_assignments(text: &str, hits: &mut Vec<super::formats::Hit>) {
    let b = text.as_bytes();
    let known = hits.len();
    let mut from = 0;
    while let Some(off) = memchr::memchr2(b'=', b':', &b[from..]) {
        let at = from + off;
        from = at + 1;
        // The name: back over up to two quotes or spaces, then name bytes (at most 64).
        let mut end = at;
        for _ in 0..2 {
            if end > 0 && matches!(b[end - 1], b'"' | b'\'' | b' ' | b'\t') {
                end -= 1;
            }
        }
        let mut start = end;
        while start > 0 && end - start < 64 && is_name(b[start - 1]) {
            start -= 1;
        }
        if start == end || credential_name(&text[start..end]).is_none() {
            continue;
        }
        // The value: forward over spaces and one opening quote, then to a delimiter.
        let mut v = at + 1;
        while v < b.len() && matches!(b[v], b' ' | b'\t') {
            v += 1;
        }
        if v < b.len() && matches!(b[v], b'"' | b'\'') {
            v += 1;
        }
        let mut e = v;
        while e < b.len() && e - v < 4096 && !ends_value(b[e]) {
            e += 1;
        }
        from = from.max(e);
        if e == v || hits[..known].iter().any(|h| h.start < e && v < h.end) {
            continue;
        }
        if let Some(kind) = named_value(&text[start..end], &text[v..e]) {
            hits.push(super::formats::Hit {
                start: v,
                end: e,
                kind,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_last_word_check_knows_every_last_word() {
        for w in LAST_WORDS.iter().chain(&["key"]) {
            assert!(could_end_a_credential_name(w.as_bytes()), "{w}");
            assert!(
                could_end_a_credential_name(w.to_uppercase().as_bytes()),
                "{w}"
            );
        }
        for w in ["content", "role", "model", "keys", "tokens", "authors"] {
            assert!(!could_end_a_credential_name(w.as_bytes()), "{w}");
        }
    }

    #[test]
    fn names() {
        for n in [
            "api_key",
            "apiKey",
            "API-KEY",
            "apikey",
            "client_secret",
            "clientSecret",
            "access_token",
            "refresh_token",
            "token",
            "password",
            "db_password",
            "x-service-token",
            "OPENAI_API_KEY",
            "private_key",
            "auth",
            "subscription-key",
        ] {
            assert!(credential_name(n).is_some(), "{n}");
        }
        for n in [
            "max_tokens",
            "token_count",
            "tokenizer",
            "api_key_name",
            "key",
            "public_key",
            "next_page_token",
            "csrf_token",
            "token_type",
            "secret_name",
            "author",
            "monkey",
            "passwordPolicy",
        ] {
            assert!(credential_name(n).is_none(), "{n}");
        }
        assert_eq!(
            credential_name("aws_secret_access_key"),
            Some(NameKind::AwsSecret)
        );
        assert_eq!(
            credential_name("SecretAccessKey"),
            Some(NameKind::AwsSecret)
        );
    }

    #[test]
    fn assignments_in_text() {
        let text = "# .env\nOPENAI_API_KEY=Q2x8rT5vW9zK3mN7pL1sD4fG6hJ0aB\nDEBUG=true\n\
                    {\"client_secret\": \"Zk4@pQ9-wX2_rT7!mN3#vB8%\", \"max_tokens\": 5}\n\
                    password: hunter2hunter2 url=https://x.test/a?b=c";
        let mut hits = Vec::new();
        find_assignments(text, &mut hits);
        let got: Vec<(&str, &str)> = hits.iter().map(|h| (h.kind, h.of(text))).collect();
        assert_eq!(
            got,
            [
                ("credential_field", "Q2x8rT5vW9zK3mN7pL1sD4fG6hJ0aB"),
                ("credential_field", "Zk4@pQ9-wX2_rT7!mN3#vB8%"),
                ("password", "hunter2hunter2"),
            ]
        );
        // Adversarial input stays linear: each byte is scanned a bounded number of times.
        let long = "token:".repeat(50_000);
        let mut hits = Vec::new();
        find_assignments(&long, &mut hits);
        assert!(hits.is_empty());
    }

    #[test]
    fn values() {
        assert_eq!(
            named_value("api_key", "Q2x8rT5vW9zK3mN7pL1sD4fG6hJ0aB"),
            Some("credential_field")
        );
        assert_eq!(
            named_value(
                "aws_secret_access_key",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8Ks9Tb2e"
            ),
            Some("aws_secret_access_key")
        );
        assert_eq!(named_value("password", "Tr0ub4dor&3x"), Some("password"));
        for (n, v) in [
            ("api_key", "${OPENAI_API_KEY}"),
            ("token", "Bearer"),
            ("password", "********"),
            ("auth", "oauth2"),
            ("client_secret", "<your-client-secret>"),
            ("token", "https://idp.example/token"),
            ("secret", "this is not a secret at all"),
            ("access_token", "aaaaaaaaaaaaaaaaaaaaaaaa"),
            ("api_key", "1234567890123456789"),
        ] {
            assert_eq!(named_value(n, v), None, "{n}={v}");
        }
    }
}

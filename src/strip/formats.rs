//! Known credential formats: a prefix, the charset of what follows, and its length bounds.
//!
//! Facts come from the vendors' public documentation of their token formats. This is the first
//! set; the broad detector (checksums, entropy, bodies) deepens it.

/// Characters a token body may use.
#[derive(Clone, Copy)]
enum Charset {
    /// `A-Za-z0-9`
    Alnum,
    /// `A-Za-z0-9_-`
    UrlSafe,
    /// `A-Z0-9`
    UpperAlnum,
}

impl Charset {
    fn accepts(self, b: u8) -> bool {
        match self {
            Charset::Alnum => b.is_ascii_alphanumeric(),
            Charset::UrlSafe => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
            Charset::UpperAlnum => b.is_ascii_uppercase() || b.is_ascii_digit(),
        }
    }
}

struct Format {
    kind: &'static str,
    prefix: &'static str,
    charset: Charset,
    min: usize,
    max: usize,
}

const fn f(
    kind: &'static str,
    prefix: &'static str,
    charset: Charset,
    min: usize,
    max: usize,
) -> Format {
    Format {
        kind,
        prefix,
        charset,
        min,
        max,
    }
}

/// Ordered so a longer, more specific prefix is tried before a shorter one it starts with.
static FORMATS: &[Format] = &[
    f(
        "anthropic_api_key",
        "sk-ant-api03-",
        Charset::UrlSafe,
        80,
        120,
    ),
    f(
        "anthropic_admin_key",
        "sk-ant-admin01-",
        Charset::UrlSafe,
        80,
        120,
    ),
    f("openai_project_key", "sk-proj-", Charset::UrlSafe, 40, 200),
    f(
        "openai_service_account_key",
        "sk-svcacct-",
        Charset::UrlSafe,
        40,
        200,
    ),
    f("openai_admin_key", "sk-admin-", Charset::UrlSafe, 40, 200),
    f("stripe_secret_key", "sk_live_", Charset::Alnum, 24, 247),
    f(
        "stripe_test_secret_key",
        "sk_test_",
        Charset::Alnum,
        24,
        247,
    ),
    f("stripe_restricted_key", "rk_live_", Charset::Alnum, 24, 247),
    f("openai_api_key", "sk-", Charset::UrlSafe, 32, 200),
    f("github_pat", "github_pat_", Charset::UrlSafe, 70, 100),
    f("github_token", "ghp_", Charset::Alnum, 36, 36),
    f("github_token", "gho_", Charset::Alnum, 36, 36),
    f("github_token", "ghu_", Charset::Alnum, 36, 36),
    f("github_token", "ghs_", Charset::Alnum, 36, 36),
    f("github_token", "ghr_", Charset::Alnum, 36, 36),
    f("gitlab_token", "glpat-", Charset::UrlSafe, 20, 64),
    f("huggingface_token", "hf_", Charset::Alnum, 30, 40),
    f("google_api_key", "AIza", Charset::UrlSafe, 35, 35),
    f("aws_access_key_id", "AKIA", Charset::UpperAlnum, 16, 16),
    f("aws_access_key_id", "ASIA", Charset::UpperAlnum, 16, 16),
    f("slack_token", "xoxb-", Charset::UrlSafe, 20, 255),
    f("slack_token", "xoxp-", Charset::UrlSafe, 20, 255),
    f("slack_token", "xoxa-", Charset::UrlSafe, 20, 255),
    f("npm_token", "npm_", Charset::Alnum, 36, 36),
    f("pypi_token", "pypi-", Charset::UrlSafe, 50, 250),
    f("vault_token", "hvs.", Charset::UrlSafe, 24, 250),
    f("groq_api_key", "gsk_", Charset::Alnum, 48, 60),
    f("replicate_token", "r8_", Charset::Alnum, 37, 40),
];

/// The credential type of a value that is exactly one known token, if any.
pub fn classify(v: &str) -> Option<&'static str> {
    let b = v.as_bytes();
    for fmt in FORMATS {
        if let Some(rest) = b.strip_prefix(fmt.prefix.as_bytes())
            && (fmt.min..=fmt.max).contains(&rest.len())
            && rest.iter().all(|&c| fmt.charset.accepts(c))
        {
            return Some(fmt.kind);
        }
    }
    if is_jwt(v) {
        return Some("jwt");
    }
    None
}

/// A compact JWS: three base64url parts, the first two JSON objects (`eyJ`).
fn is_jwt(v: &str) -> bool {
    let mut parts = v.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64 = |x: &str| x.bytes().all(|c| Charset::UrlSafe.accepts(c));
    h.starts_with("eyJ")
        && p.starts_with("eyJ")
        && h.len() > 10
        && p.len() > 10
        && b64(h)
        && b64(p)
        && b64(s)
}

/// Values that are clearly not secrets: placeholders and templates left in sample code.
pub fn is_placeholder(v: &str) -> bool {
    let t = v.trim();
    if t.is_empty() || t.len() < 8 {
        return true;
    }
    let lower = t.to_ascii_lowercase();
    (t.starts_with("${") && t.ends_with('}'))
        || (t.starts_with("{{") && t.ends_with("}}"))
        || (t.starts_with('<') && t.ends_with('>'))
        || t.contains("...")
        || t.bytes()
            .all(|b| b == b'x' || b == b'X' || b == b'*' || b == b'-' || b == b'_')
        || [
            "your-",
            "your_",
            "changeme",
            "placeholder",
            "redacted",
            "example",
        ]
        .iter()
        .any(|w| lower.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_formats() {
        let proj = format!("sk-proj-{}", "aB3_".repeat(12));
        assert_eq!(classify(&proj), Some("openai_project_key"));
        assert_eq!(
            classify(&format!("ghp_{}", "a1B2".repeat(9))),
            Some("github_token")
        );
        assert_eq!(classify("AKIAIOSFODNN7EXAMPLE"), Some("aws_access_key_id"));
        assert_eq!(
            classify(&format!("hf_{}", "abcDEF1234".repeat(3) + "wxyz")),
            Some("huggingface_token")
        );
        assert_eq!(
            classify(
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
            ),
            Some("jwt")
        );
    }

    #[test]
    fn look_alikes_pass() {
        assert_eq!(classify("sk-short"), None);
        assert_eq!(classify("550e8400-e29b-41d4-a716-446655440000"), None);
        assert_eq!(classify("da39a3ee5e6b4b0d3255bfef95601890afd80709"), None);
        assert_eq!(classify("pk_live_abcdefghijklmnopqrstuvwx"), None);
        assert!(is_placeholder("${OPENAI_API_KEY}"));
        assert!(is_placeholder("<your-key>"));
        assert!(is_placeholder("sk-..."));
        assert!(!is_placeholder("s3cr3t-value-abcdef"));
    }
}

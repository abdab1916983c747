//! Known credential formats: a prefix, the charset of what follows, its length bounds and,
//! where the vendor publishes one, a checksum.
//!
//! Facts come from the vendors' public documentation of their token formats (GitHub's and
//! npm's token-format announcements for the CRC32 checksum, each vendor's API-key pages for
//! prefixes and lengths). Formats without a distinctive prefix (Cohere, Mistral, Azure
//! OpenAI, Datadog keys) are caught by where they are sent (API-key headers,
//! credential-named fields), not here.

/// Characters a token body may use.
#[derive(Clone, Copy)]
enum Charset {
    /// `A-Za-z0-9`
    Alnum,
    /// `A-Za-z0-9_-`
    UrlSafe,
    /// `A-Za-z0-9_-.`
    UrlSafeDot,
    /// `A-Za-z0-9_-=` (base64url with padding)
    UrlSafePad,
    /// `A-Z0-9`
    UpperAlnum,
    /// `0-9a-f`
    LowerHex,
    /// `0-9a-f-`
    LowerHexDash,
}

impl Charset {
    /// Charsets too narrow for prose to fall into (AWS key ids are all letters about one
    /// time in 28, so they must not need a digit).
    fn is_strict(self) -> bool {
        matches!(
            self,
            Charset::UpperAlnum | Charset::LowerHex | Charset::LowerHexDash
        )
    }

    fn accepts(self, b: u8) -> bool {
        match self {
            Charset::Alnum => b.is_ascii_alphanumeric(),
            Charset::UrlSafe => b.is_ascii_alphanumeric() || b == b'_' || b == b'-',
            Charset::UrlSafeDot => b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'),
            Charset::UrlSafePad => b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'='),
            Charset::UpperAlnum => b.is_ascii_uppercase() || b.is_ascii_digit(),
            Charset::LowerHex => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            Charset::LowerHexDash => b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-',
        }
    }
}

/// A check beyond charset and length.
#[derive(Clone, Copy)]
enum Check {
    None,
    /// The last 6 characters are the base62 CRC32 of the 30 before them (GitHub classic
    /// tokens, npm tokens).
    Crc32Base62,
}

struct Format {
    kind: &'static str,
    prefix: &'static str,
    charset: Charset,
    min: usize,
    max: usize,
    check: Check,
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
        check: Check::None,
    }
}

const fn crc(kind: &'static str, prefix: &'static str) -> Format {
    Format {
        kind,
        prefix,
        charset: Charset::Alnum,
        min: 36,
        max: 36,
        check: Check::Crc32Base62,
    }
}

use Charset::*;

/// Ordered so a longer, more specific prefix is tried before a shorter one it starts with.
static FORMATS: &[Format] = &[
    // Model providers.
    f("anthropic_api_key", "sk-ant-api03-", UrlSafe, 80, 120),
    f("anthropic_admin_key", "sk-ant-admin01-", UrlSafe, 80, 120),
    f("openrouter_api_key", "sk-or-v1-", LowerHex, 64, 64),
    f("openai_project_key", "sk-proj-", UrlSafe, 40, 256),
    f(
        "openai_service_account_key",
        "sk-svcacct-",
        UrlSafe,
        40,
        256,
    ),
    f("openai_admin_key", "sk-admin-", UrlSafe, 40, 256),
    f("stripe_secret_key", "sk_live_", Alnum, 24, 247),
    f("stripe_test_secret_key", "sk_test_", Alnum, 24, 247),
    f("stripe_restricted_key", "rk_live_", Alnum, 24, 247),
    f("stripe_test_restricted_key", "rk_test_", Alnum, 24, 247),
    f("stripe_webhook_secret", "whsec_", Alnum, 32, 64),
    // `sk-` + 48 alphanumerics (legacy OpenAI) or 32 hex (DeepSeek and others that copied
    // the shape). No `-` or `_`: that keeps slugs like `sk-2024-annual-report-...` out.
    f("openai_api_key", "sk-", Alnum, 32, 200),
    f("google_api_key", "AIza", UrlSafe, 35, 35),
    f("google_oauth_access_token", "ya29.", UrlSafeDot, 30, 2048),
    f("groq_api_key", "gsk_", Alnum, 48, 60),
    f("huggingface_token", "hf_", Alnum, 30, 40),
    f("huggingface_org_token", "api_org_", Alnum, 30, 40),
    f("replicate_token", "r8_", Alnum, 37, 40),
    f("perplexity_api_key", "pplx-", Alnum, 40, 64),
    f("xai_api_key", "xai-", Alnum, 70, 90),
    f("together_api_key", "tgp_v1_", UrlSafe, 40, 50),
    f("fireworks_api_key", "fw_", Alnum, 20, 40),
    f("langsmith_api_key", "lsv2_pt_", UrlSafe, 40, 50),
    f("langsmith_service_key", "lsv2_sk_", UrlSafe, 40, 50),
    f("pinecone_api_key", "pcsk_", UrlSafe, 40, 100),
    // Clouds.
    f("aws_access_key_id", "AKIA", UpperAlnum, 16, 16),
    f("aws_access_key_id", "ASIA", UpperAlnum, 16, 16),
    f("alibaba_access_key_id", "LTAI", Alnum, 12, 20),
    f("digitalocean_token", "dop_v1_", LowerHex, 64, 64),
    f("digitalocean_oauth_token", "doo_v1_", LowerHex, 64, 64),
    f("digitalocean_refresh_token", "dor_v1_", LowerHex, 64, 64),
    f("heroku_api_key", "HRKU-", UrlSafe, 40, 70),
    f("databricks_token", "dapi", LowerHexDash, 32, 36),
    f("supabase_token", "sbp_", LowerHex, 40, 40),
    f("supabase_secret_key", "sb_secret_", UrlSafe, 30, 60),
    f("planetscale_token", "pscale_tkn_", UrlSafe, 32, 64),
    f("planetscale_password", "pscale_pw_", UrlSafe, 32, 64),
    f("vault_token", "hvs.", UrlSafe, 24, 250),
    f("vault_batch_token", "hvb.", UrlSafe, 24, 250),
    f("vault_recovery_token", "hvr.", UrlSafe, 24, 250),
    f("doppler_token", "dp.pt.", Alnum, 40, 44),
    f("doppler_token", "dp.st.", UrlSafeDot, 40, 64),
    f("doppler_token", "dp.sa.", Alnum, 40, 44),
    f("doppler_token", "dp.ct.", Alnum, 40, 44),
    f("age_secret_key", "AGE-SECRET-KEY-1", UpperAlnum, 58, 58),
    // Code hosting and registries.
    f("github_fine_grained_pat", "github_pat_", UrlSafe, 70, 100),
    crc("github_pat", "ghp_"),
    crc("github_oauth_token", "gho_"),
    crc("github_user_token", "ghu_"),
    crc("github_server_token", "ghs_"),
    crc("github_refresh_token", "ghr_"),
    crc("npm_token", "npm_"),
    f("gitlab_pat", "glpat-", UrlSafeDot, 20, 64),
    f("gitlab_deploy_token", "gldt-", UrlSafe, 20, 64),
    f("gitlab_runner_token", "glrt-", UrlSafeDot, 20, 64),
    f("gitlab_ci_job_token", "glcbt-", UrlSafe, 20, 80),
    f("gitlab_trigger_token", "glptt-", UrlSafe, 20, 64),
    f("gitlab_feed_token", "glft-", UrlSafe, 20, 64),
    f("gitlab_oauth_secret", "gloas-", UrlSafe, 20, 80),
    f(
        "gitlab_runner_registration_token",
        "GR1348941",
        UrlSafe,
        20,
        40,
    ),
    f("pypi_token", "pypi-", UrlSafe, 50, 250),
    f("rubygems_api_key", "rubygems_", LowerHex, 48, 48),
    f("dockerhub_pat", "dckr_pat_", UrlSafe, 27, 40),
    // SaaS.
    f("slack_bot_token", "xoxb-", UrlSafe, 20, 255),
    f("slack_user_token", "xoxp-", UrlSafe, 20, 255),
    f("slack_token", "xoxa-", UrlSafe, 20, 255),
    f("slack_token", "xoxr-", UrlSafe, 20, 255),
    f("slack_config_token", "xoxe.xoxp-", UrlSafe, 20, 255),
    f("slack_refresh_token", "xoxe-", UrlSafe, 20, 255),
    f("slack_app_token", "xapp-", UrlSafe, 20, 255),
    f("twilio_api_key", "SK", LowerHex, 32, 32),
    f("notion_token", "secret_", Alnum, 43, 43),
    f("notion_token", "ntn_", Alnum, 40, 50),
    f("linear_api_key", "lin_api_", Alnum, 40, 40),
    f("linear_oauth_token", "lin_oauth_", LowerHex, 64, 64),
    f("shopify_access_token", "shpat_", LowerHex, 32, 32),
    f("shopify_custom_app_token", "shpca_", LowerHex, 32, 32),
    f("shopify_private_app_token", "shppa_", LowerHex, 32, 32),
    f("shopify_shared_secret", "shpss_", LowerHex, 32, 32),
    f("atlassian_api_token", "ATATT3", UrlSafePad, 150, 250),
    f("postman_api_key", "PMAK-", LowerHexDash, 59, 59),
    f("mailgun_api_key", "key-", LowerHex, 32, 32),
    f("square_access_token", "EAAA", UrlSafe, 60, 60),
    f("square_access_token", "sq0atp-", UrlSafe, 22, 22),
    f("square_oauth_secret", "sq0csp-", UrlSafe, 43, 43),
    f("grafana_cloud_token", "glc_", UrlSafePad, 32, 400),
    f("grafana_service_account_token", "glsa_", UrlSafe, 41, 41),
    f("newrelic_user_key", "NRAK-", UpperAlnum, 27, 27),
    f("sentry_user_token", "sntryu_", LowerHex, 64, 64),
    f("sentry_org_token", "sntrys_", UrlSafePad, 60, 300),
    f("figma_token", "figd_", UrlSafe, 40, 50),
    f("typeform_token", "tfp_", UrlSafeDot, 40, 70),
];

/// Base62 alphabet of GitHub's and npm's checksums.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `crc32(random)` in base62, left-padded with `0` to 6 characters.
fn crc32_base62(random: &[u8]) -> [u8; 6] {
    let mut n = crc32fast::hash(random);
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

impl Check {
    fn passes(self, body: &[u8]) -> bool {
        match self {
            Check::None => true,
            Check::Crc32Base62 => {
                let (random, sum) = body.split_at(body.len() - 6);
                crc32_base62(random) == sum
            }
        }
    }
}

/// How many of lowercase, uppercase and digits occur in `b`. Real token bodies are random and
/// mix at least two; words like `sk-learn-tutorial-for-beginners-part-two` do not.
pub(super) fn classes(b: &[u8]) -> u8 {
    let (mut l, mut u, mut d) = (0u8, 0u8, 0u8);
    for &c in b {
        l |= u8::from(c.is_ascii_lowercase());
        u |= u8::from(c.is_ascii_uppercase());
        d |= u8::from(c.is_ascii_digit());
    }
    l + u + d
}

/// Bytes that continue a word: a token must not start or end next to one.
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

/// Length of the run of `accepts` bytes in `b`, looking at no more than `cap`.
fn run(b: &[u8], cap: usize, accepts: impl Fn(u8) -> bool) -> usize {
    b.iter().take(cap).take_while(|&&c| accepts(c)).count()
}

/// True when `end` is the end of `b` or a byte that cannot continue a token.
fn ends_at(b: &[u8], end: usize) -> bool {
    b.get(end).is_none_or(|&c| !is_word(c))
}

/// Formats with inner structure a prefix table cannot express, starting at `b[0]`; the length
/// and type of the token found.
fn structured(b: &[u8]) -> Option<(usize, &'static str)> {
    let url_safe = |c: u8| UrlSafe.accepts(c);
    let hex = |c: u8| LowerHex.accepts(c);
    match b.first()? {
        // SendGrid: `SG.` + 22 + `.` + 43.
        b'S' if b.starts_with(b"SG.") => {
            let id = run(&b[3..], 23, url_safe);
            if id == 22 && b.get(25) == Some(&b'.') && run(&b[26..], 44, url_safe) == 43 {
                return ends_at(b, 69).then_some((69, "sendgrid_api_key"));
            }
        }
        // A PEM private key (RSA, EC, OpenSSH, PKCS#8, encrypted or not), through its END
        // line, or to the end of the text when it has none.
        b'-' if b.starts_with(b"-----BEGIN ") => {
            let line = &b[..b.len().min(64)];
            let head = memchr::memmem::find(line, b"PRIVATE KEY-----")?;
            let after = head + 16;
            let end = match memchr::memmem::find(&b[after..], b"-----END ") {
                Some(e) => {
                    let tail = after + e + 9;
                    tail + memchr::memmem::find(&b[tail..], b"-----")
                        .map_or(b.len() - tail, |x| x + 5)
                }
                None => b.len(),
            };
            return Some((end, "private_key_pem"));
        }
        // Airtable personal access token: `pat` + 14 + `.` + 64 hex.
        b'p' if b.starts_with(b"pat")
            && run(&b[3..], 15, |c| c.is_ascii_alphanumeric()) == 14
            && b.get(17) == Some(&b'.')
            && run(&b[18..], 65, hex) == 64
            && ends_at(b, 82) =>
        {
            return Some((82, "airtable_pat"));
        }
        // Azure storage connection strings: the account key after `AccountKey=`, the Service
        // Bus / Event Hubs key after `SharedAccessKey=`.
        b'A' if b.starts_with(b"AccountKey=") => {
            let n = run(&b[11..], 89, |c| {
                c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')
            });
            if (86..=88).contains(&n) && b[11 + n - 1] == b'=' {
                return Some((11 + n, "azure_storage_account_key"));
            }
        }
        b'S' if b.starts_with(b"SharedAccessKey=") => {
            let n = run(&b[16..], 45, |c| {
                c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')
            });
            if n == 44 && b[16 + 43] == b'=' {
                return Some((60, "azure_shared_access_key"));
            }
        }
        _ => {}
    }
    // Mailchimp: 32 hex + `-us` + datacenter number.
    if b.len() >= 36 && run(b, 33, hex) == 32 && b[32..].starts_with(b"-us") {
        let n = run(&b[35..], 3, |c| c.is_ascii_digit());
        if n > 0 && ends_at(b, 35 + n) {
            return Some((35 + n, "mailchimp_api_key"));
        }
    }
    // Azure AD (Entra ID) client secret: 3 characters, a digit, `Q~`, then 31 to 34.
    if b.len() >= 37 && b[3].is_ascii_digit() && &b[4..6] == b"Q~" {
        let n = run(b, 41, |c| {
            c.is_ascii_alphanumeric() || matches!(c, b'_' | b'~' | b'.' | b'-')
        });
        if (37..=40).contains(&n) && ends_at(b, n) && classes(&b[6..n]) >= 2 {
            return Some((n, "azure_ad_client_secret"));
        }
    }
    // Terraform Cloud / HCP: 14 + `.atlasv1.` + 60 or more.
    if b.len() >= 83
        && &b[14..23] == b".atlasv1."
        && run(b, 14, |c| c.is_ascii_alphanumeric()) == 14
    {
        let n = run(&b[23..], 256, url_safe);
        if n >= 60 && ends_at(b, 23 + n) {
            return Some((23 + n, "terraform_cloud_token"));
        }
    }
    None
}

/// A compact JWS at `b[0]`: three base64url parts, the first two JSON objects (`eyJ`).
fn jwt_at(b: &[u8]) -> Option<usize> {
    const MAX: usize = 16 * 1024;
    let url_safe = |c: u8| UrlSafe.accepts(c);
    let h = run(b, MAX, url_safe);
    if h <= 10 || b.get(h) != Some(&b'.') || !b[h + 1..].starts_with(b"eyJ") {
        return None;
    }
    let p = run(&b[h + 1..], MAX, url_safe);
    let s_at = h + 1 + p + 1;
    if p <= 10 || b.get(s_at - 1) != Some(&b'.') {
        return None;
    }
    let s = run(&b[s_at..], MAX, url_safe);
    let end = s_at + s;
    (b.get(end) != Some(&b'.') && ends_at(b, end)).then_some(end)
}

/// Indexes into [`FORMATS`] by the first byte of the prefix, in table order, so a value is
/// only compared with the few formats that can match it (a typical header value with none).
static BY_FIRST_BYTE: std::sync::LazyLock<Vec<Vec<u8>>> = std::sync::LazyLock::new(|| {
    let mut index = vec![Vec::new(); 128];
    for (i, fmt) in FORMATS.iter().enumerate() {
        let i = u8::try_from(i).expect("fewer than 256 formats");
        index[usize::from(fmt.prefix.as_bytes()[0] & 0x7f)].push(i);
    }
    index
});

/// The known token that starts at `b[0]`, if any: its length and type. The token must end
/// at the end of `b` or before a byte that cannot continue it. Work is bounded by the longest
/// format (a few hundred bytes), whatever `b` holds.
fn match_at(b: &[u8]) -> Option<(usize, &'static str)> {
    let first = *b.first()?;
    if first < 128 {
        for fmt in BY_FIRST_BYTE[usize::from(first)]
            .iter()
            .map(|&i| &FORMATS[usize::from(i)])
        {
            let Some(rest) = b.strip_prefix(fmt.prefix.as_bytes()) else {
                continue;
            };
            let n = run(rest, fmt.max + 1, |c| fmt.charset.accepts(c));
            let end = fmt.prefix.len() + n;
            if (fmt.min..=fmt.max).contains(&n)
                && ends_at(b, end)
                && (fmt.charset.is_strict() || classes(&rest[..n]) >= 2)
                && fmt.check.passes(&rest[..n])
            {
                return Some((end, fmt.kind));
            }
        }
    }
    if first == b'e'
        && b.starts_with(b"eyJ")
        && let Some(n) = jwt_at(b)
    {
        return Some((n, "jwt"));
    }
    structured(b)
}

/// The credential type of a value that is exactly one known token, if any.
pub(crate) fn classify(v: &str) -> Option<&'static str> {
    match match_at(v.as_bytes()) {
        Some((n, kind)) if n == v.len() => Some(kind),
        _ => None,
    }
}

/// One known token found in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    /// Byte offset of its first byte.
    pub(crate) start: usize,
    /// Byte offset just past it.
    pub(crate) end: usize,
    /// Credential type.
    pub(crate) kind: &'static str,
}

impl Hit {
    /// The token within the text it was found in.
    pub(crate) fn of<'t>(&self, text: &'t str) -> &'t str {
        &text[self.start..self.end]
    }
}

/// The shortest token any format accepts (`LTAI` + 12); a test keeps it true.
const MIN_TOKEN: usize = 16;

/// Bytes a token can hold (PEM blocks aside, which are found on their own), as a table: this
/// test runs once per byte of every inspected value.
static TOKEN_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric()
            || matches!(b, b'_' | b'-' | b'.' | b'~' | b'+' | b'/' | b'=');
        c += 1;
    }
    t
};

fn is_token_byte(c: u8) -> bool {
    TOKEN_BYTE[usize::from(c)]
}

/// Every known token in free text (a prompt, a pasted `.env` file, a URL, a JSON string),
/// each once, placeholders left out.
///
/// Tokens start at a word boundary inside a run of token bytes at least [`MIN_TOKEN`] long,
/// so prose (short words) costs one table lookup a byte. After a hit the search resumes past
/// it and each try is bounded by the longest format, so the time is linear in the text.
pub(crate) fn find_tokens(text: &str, out: &mut Vec<Hit>) {
    let b = text.as_bytes();
    let push = |start: usize, n: usize, kind: &'static str, out: &mut Vec<Hit>| {
        if !is_placeholder(&text[start..start + n]) {
            out.push(Hit {
                start,
                end: start + n,
                kind,
            });
        }
    };
    // PEM blocks first: they hold spaces and newlines, so no run covers them.
    let mut pem_end = 0;
    let mut pems: Vec<(usize, usize)> = Vec::new();
    // Built once: a searcher's set-up costs more than searching a header value.
    static PEM_BEGIN: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"-----BEGIN "));
    // A PEM private key is far longer than 64 bytes; shorter text need not be searched.
    let pem_text = if b.len() >= 64 { b } else { &[] };
    for at in PEM_BEGIN.find_iter(pem_text) {
        if at < pem_end {
            continue;
        }
        if let Some((n, kind)) = structured(&b[at..]) {
            push(at, n, kind, out);
            pems.push((at, at + n));
            pem_end = at + n;
        }
    }
    let mut pems = pems.into_iter().peekable();
    // Invariant: no run of token bytes that starts before `i` is still to be looked at, and
    // a run containing a position past `i` starts at `i` or later.
    let mut i = 0;
    while i + MIN_TOKEN <= b.len() {
        // Any run of MIN_TOKEN or more bytes starting in [i, probe] covers `probe`: when that
        // byte is not a token byte, none starts there, and MIN_TOKEN bytes are skipped at once.
        let probe = i + MIN_TOKEN - 1;
        if !is_token_byte(b[probe]) {
            i = probe + 1;
            continue;
        }
        let mut start = probe;
        while start > i && is_token_byte(b[start - 1]) {
            start -= 1;
        }
        i = probe + 1;
        while i < b.len() && is_token_byte(b[i]) {
            i += 1;
        }
        while pems.peek().is_some_and(|&(_, e)| e <= start) {
            pems.next();
        }
        if i - start < MIN_TOKEN || pems.peek().is_some_and(|&(s, _)| s <= start) {
            continue;
        }
        // A token never runs into a PEM block that follows it.
        let limit = pems.peek().map_or(b.len(), |&(s, _)| s);
        let mut j = start;
        while j < i.min(limit) {
            if j > start && is_word(b[j - 1]) {
                j += 1;
                continue;
            }
            match match_at(&b[j..limit]) {
                Some((n, kind)) => {
                    push(j, n, kind, out);
                    j += n;
                }
                None => j += 1,
            }
        }
        i = i.max(j);
    }
}

/// Every credential type this table knows.
#[cfg(test)]
fn known_types() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FORMATS.iter().map(|f| f.kind).collect();
    v.extend([
        "jwt",
        "sendgrid_api_key",
        "mailchimp_api_key",
        "azure_ad_client_secret",
        "terraform_cloud_token",
        "airtable_pat",
        "private_key_pem",
        "azure_storage_account_key",
        "azure_shared_access_key",
    ]);
    v.sort_unstable();
    v.dedup();
    v
}

/// Values that are clearly not secrets: placeholders and templates left in sample code.
pub(crate) fn is_placeholder(v: &str) -> bool {
    let t = v.trim();
    if t.is_empty() || t.len() < 8 {
        return true;
    }
    // Template words, any case, in one pass without allocating.
    let b = t.as_bytes();
    let at = |i: usize, w: &str| {
        b.get(i..i + w.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(w.as_bytes()))
    };
    let template_word = (0..b.len()).any(|i| match b[i] | 0x20 {
        b'y' => at(i, "your-") || at(i, "your_"),
        b'c' => at(i, "changeme"),
        b'p' => at(i, "placeholder"),
        b'r' => at(i, "redacted"),
        b'e' => at(i, "example"),
        _ => false,
    });
    (t.starts_with("${") && t.ends_with('}'))
        || (t.starts_with("{{") && t.ends_with("}}"))
        || (t.starts_with('<') && t.ends_with('>'))
        || t.contains("...")
        || t.bytes()
            .all(|b| b == b'x' || b == b'X' || b == b'*' || b == b'-' || b == b'_')
        || template_word
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token of `fmt`'s shape: its prefix, then `min` characters of its charset (with a
    /// valid checksum where it has one).
    fn sample(fmt: &Format, seed: usize) -> String {
        let pool: Vec<u8> = (0u8..=127).filter(|&c| fmt.charset.accepts(c)).collect();
        let mut body: Vec<u8> = (0..fmt.min)
            .map(|i| pool[(i * 7 + seed * 13 + i * i) % pool.len()])
            .collect();
        if let Check::Crc32Base62 = fmt.check {
            let n = body.len() - 6;
            let sum = crc32_base62(&body[..n]);
            body[n..].copy_from_slice(&sum);
        }
        format!("{}{}", fmt.prefix, String::from_utf8(body).unwrap())
    }

    #[test]
    fn no_token_is_shorter_than_min_token() {
        for fmt in FORMATS {
            assert!(fmt.prefix.len() + fmt.min >= MIN_TOKEN, "{}", fmt.kind);
        }
    }

    #[test]
    fn tokens_are_found_in_text_once_each() {
        let gh = "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";
        let pem = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oF1JGa8xGzs1oAoGCCqGSM49\n-----END EC PRIVATE KEY-----";
        let text = format!(
            "see {gh}, and url https://x.test/?k={gh}&v=1 then\n{pem}\nAKIAIOSFODNN7EXAMPLZ."
        );
        let mut hits = Vec::new();
        find_tokens(&text, &mut hits);
        let got: Vec<(&str, &str)> = hits.iter().map(|h| (h.kind, h.of(&text))).collect();
        assert_eq!(
            got,
            [
                ("private_key_pem", pem),
                ("github_pat", gh),
                ("github_pat", gh),
                ("aws_access_key_id", "AKIAIOSFODNN7EXAMPLZ"),
            ]
        );
        // Inside a longer word, a prefix is not a token.
        let mut hits = Vec::new();
        find_tokens(&format!("x{gh}"), &mut hits);
        assert!(hits.is_empty());
    }

    #[test]
    fn every_format_is_reachable_and_named() {
        for (i, fmt) in FORMATS.iter().enumerate() {
            let v = sample(fmt, i);
            assert_eq!(classify(&v), Some(fmt.kind), "{v} is shadowed");
        }
        assert!(known_types().len() >= 90, "{}", known_types().len());
    }

    #[test]
    fn github_and_npm_checksums_are_verified() {
        // The 30 random characters of a real-shaped token, checksummed as GitHub does.
        let random = "16C7e42F292c6912E7710c838347Ae";
        let sum = String::from_utf8(crc32_base62(random.as_bytes()).to_vec()).unwrap();
        let token = format!("ghp_{random}{sum}");
        assert_eq!(classify(&token), Some("github_pat"));
        assert_eq!(classify(&format!("npm_{random}{sum}")), Some("npm_token"));
        // One character off: not a GitHub token (and not flagged as one).
        let mut bad = token.clone().into_bytes();
        bad[10] = if bad[10] == b'a' { b'b' } else { b'a' };
        assert_eq!(classify(std::str::from_utf8(&bad).unwrap()), None);
    }

    #[test]
    fn known_formats() {
        let proj = format!("sk-proj-{}", "aB3_".repeat(12));
        assert_eq!(classify(&proj), Some("openai_project_key"));
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
        assert_eq!(
            classify(&format!(
                "SG.{}.{}",
                "a".repeat(22),
                "B1-_".repeat(10) + "xyz"
            )),
            Some("sendgrid_api_key")
        );
        assert_eq!(
            classify(&format!("{}-us21", "0123456789abcdef".repeat(2))),
            Some("mailchimp_api_key")
        );
        assert_eq!(
            classify("abc8Q~defghijklmnopqrstuvwxyz0123456789"),
            Some("azure_ad_client_secret")
        );
        assert_eq!(
            classify(
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
            ),
            Some("private_key_pem")
        );
        assert_eq!(
            classify(&format!("sk-or-v1-{}", "0123456789abcdef".repeat(4))),
            Some("openrouter_api_key")
        );
    }

    #[test]
    fn look_alikes_pass() {
        for benign in [
            "sk-short",
            "550e8400-e29b-41d4-a716-446655440000",
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "pk_live_abcdefghijklmnopqrstuvwx",
            "pk_test_51HxYzAbCdEfGhIjKlMnOpQrStUvWx",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "W/\"33a64df551425fcc55e4d42a148795d9f25f89d4\"",
            "text/html; charset=utf-8",
        ] {
            assert_eq!(classify(benign), None, "{benign}");
        }
        assert!(is_placeholder("${OPENAI_API_KEY}"));
        assert!(is_placeholder("<your-key>"));
        assert!(is_placeholder("sk-..."));
        assert!(!is_placeholder("s3cr3t-value-abcdef"));
    }
}

//! Secrets in the URL path: capability URLs whose path is the credential (Telegram's
//! `/bot<token>/`, Slack and Discord webhooks, Teams incoming webhooks, as each vendor
//! documents them), and any known token format in a path segment (`/v1/keys/sk-proj-...`).
//!
//! A path cannot lose a segment without saying something else, so a path secret is treated
//! as a body secret is: refused in `strip` and `block` mode, forwarded in `report` mode. In
//! every mode the line, policy and minted tokens see the path with the secret replaced by
//! `<redacted>`.

use percent_encoding::percent_decode_str;

use super::formats::{Hit, find_tokens};

/// What stands for a secret in a path as the line shows it.
pub(crate) const REDACTED: &str = "<redacted>";

/// The secrets in `path`, as (kind, byte range in `path`).
pub(crate) fn secrets(path: &str) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let segments: Vec<(usize, &str)> = path
        .split('/')
        .scan(0usize, |at, seg| {
            let start = *at;
            *at += seg.len() + 1;
            Some((start, seg))
        })
        .collect();
    for (i, &(start, seg)) in segments.iter().enumerate() {
        let prev = |n: usize| i.checked_sub(n).map(|j| segments[j].1);
        // Telegram Bot API: /bot<id>:<35 characters>/method (core.telegram.org/bots/api).
        if let Some(token) = seg.strip_prefix("bot")
            && let Some((id, secret)) = token.split_once(':')
            && (6..=12).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_digit())
            && (30..=48).contains(&secret.len())
            && secret.bytes().all(url_safe)
        {
            out.push(("telegram_bot_token", start..start + seg.len()));
            continue;
        }
        // Slack incoming webhook: /services/T.../B.../<secret> (api.slack.com/messaging/webhooks).
        if prev(3) == Some("services")
            && prev(2).is_some_and(|t| t.starts_with('T') && t.len() >= 9)
            && prev(1).is_some_and(|b| b.starts_with('B') && b.len() >= 9)
            && seg.len() >= 20
            && seg.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            out.push(("slack_webhook_url", start..start + seg.len()));
            continue;
        }
        // Discord webhook: /api[/vN]/webhooks/<id>/<token> (discord.com/developers/docs/resources/webhook).
        if prev(2) == Some("webhooks")
            && prev(1).is_some_and(|id| {
                (17..=20).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
            })
            && seg.len() >= 60
            && seg.bytes().all(url_safe)
        {
            out.push(("discord_webhook_token", start..start + seg.len()));
            continue;
        }
        // Teams / Office 365 incoming webhook: .../IncomingWebhook/<32 hex>/<guid>.
        if prev(1) == Some("IncomingWebhook")
            && seg.len() == 32
            && seg.bytes().all(|b| b.is_ascii_hexdigit())
        {
            out.push(("teams_webhook_url", start..start + seg.len()));
            continue;
        }
        // Any known token format in the segment, as written or percent-decoded.
        let decoded = percent_decode_str(seg).decode_utf8_lossy();
        let mut hits: Vec<Hit> = Vec::new();
        find_tokens(&decoded, &mut hits);
        if let Some(h) = hits.first() {
            out.push((h.kind, start..start + seg.len()));
        }
    }
    out
}

/// `path` with each secret replaced by [`REDACTED`].
pub(crate) fn redacted(path: &str, found: &[(&'static str, std::ops::Range<usize>)]) -> String {
    let mut out = String::with_capacity(path.len());
    let mut at = 0;
    for (_, r) in found {
        out.push_str(&path[at..r.start]);
        out.push_str(REDACTED);
        at = r.end;
    }
    out.push_str(&path[at..]);
    out
}

fn url_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(path: &str) -> (Vec<&'static str>, String) {
        let found = secrets(path);
        (
            found.iter().map(|(k, _)| *k).collect(),
            redacted(path, &found),
        )
    }

    #[test]
    fn capability_urls_as_the_vendors_document_them() {
        let (k, r) = kinds("/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage");
        assert_eq!(
            (k, r.as_str()),
            (vec!["telegram_bot_token"], "/<redacted>/sendMessage")
        );
        let (k, r) = kinds("/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX");
        assert_eq!(
            (k, r.as_str()),
            (
                vec!["slack_webhook_url"],
                "/services/T00000000/B00000000/<redacted>"
            )
        );
        let token = "Zx9_".repeat(17);
        let (k, _) = kinds(&format!("/api/webhooks/123456789012345678/{token}"));
        assert_eq!(k, vec!["discord_webhook_token"]);
        let (k, _) = kinds(&format!("/api/v10/webhooks/123456789012345678/{token}"));
        assert_eq!(k, vec!["discord_webhook_token"]);
        let (k, _) = kinds(
            "/webhookb2/0f7c1e2a-1111-2222-3333-444455556666@aaaabbbb-cccc-dddd-eeee-ffff00001111/IncomingWebhook/0123456789abcdef0123456789abcdef/99998888-7777-6666-5555-444433332222",
        );
        assert_eq!(k, vec!["teams_webhook_url"]);
        let key = format!("sk-proj-{}", "Zx9_".repeat(12));
        let (k, r) = kinds(&format!("/v1/keys/{key}/usage"));
        assert_eq!(
            (k, r.as_str()),
            (vec!["openai_project_key"], "/v1/keys/<redacted>/usage")
        );
    }

    #[test]
    fn ordinary_paths_hold_none() {
        for p in [
            "/v1/chat/completions",
            "/bot/sendMessage",
            "/services/billing/invoices/2026",
            "/api/webhooks/12/abc",
            "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/invoke",
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-1.5-pro:generateContent",
            "/",
            "",
        ] {
            assert!(secrets(p).is_empty(), "{p}: {:?}", secrets(p));
        }
    }
}

//! The provider catalog: what `provider: NAME` on a route fills in, from each vendor's own
//! documentation (the `docs` address of each entry). A route's own keys override the entry:
//! `match.host` replaces the hosts, `inject` the credential's place, `scopes` the scopes.
//!
//! An entry says where requests go (`hosts`, matched over HTTPS only unless the route names a
//! scheme), how the vendor takes a credential (`auth`), the version headers it requires
//! (added when the app sent none, so an app's own pin wins), and for OAuth credentials the
//! scopes its token issuer expects.

/// How a vendor takes a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    /// A header; `{token}` in `value` is the credential.
    Header {
        /// Header name, lowercase.
        name: &'static str,
        /// Value template.
        value: &'static str,
    },
    /// The request is signed with SigV4 (a credential of kind `aws`).
    SigV4 {
        /// The signing name.
        service: &'static str,
    },
}

impl std::fmt::Display for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Header { name, value } => write!(f, "{name}: {value}"),
            Auth::SigV4 { service } => write!(f, "SigV4 signature (service {service})"),
        }
    }
}

/// One vendor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Provider {
    /// The name a route gives.
    pub(crate) name: &'static str,
    /// What it is.
    pub(crate) title: &'static str,
    /// Host patterns (see `HostMatch`).
    pub(crate) hosts: &'static [&'static str],
    /// How the credential goes in.
    pub(crate) auth: Auth,
    /// Headers the vendor requires, added when the app sent none of that name.
    pub(crate) headers: &'static [(&'static str, &'static str)],
    /// Scopes asked of a token endpoint (`client_credentials`, `token_exchange`) when the
    /// route names none.
    pub(crate) scopes: &'static [&'static str],
    /// Where the vendor documents the above.
    pub(crate) docs: &'static str,
}

const fn bearer() -> Auth {
    Auth::Header {
        name: "authorization",
        value: "Bearer {token}",
    }
}

/// The catalog, by name.
pub(crate) static CATALOG: &[Provider] = &[
    Provider {
        name: "anthropic",
        title: "Anthropic Claude API",
        hosts: &["api.anthropic.com"],
        auth: Auth::Header {
            name: "x-api-key",
            value: "{token}",
        },
        headers: &[("anthropic-version", "2023-06-01")],
        scopes: &[],
        docs: "https://docs.anthropic.com/en/api/versioning",
    },
    Provider {
        name: "azure_openai",
        title: "Azure OpenAI and Azure AI Foundry (Entra ID token; `inject: {header: api-key}` for a key)",
        hosts: &[
            "*.openai.azure.com",
            "*.cognitiveservices.azure.com",
            "*.services.ai.azure.com",
        ],
        auth: bearer(),
        headers: &[],
        scopes: &["https://cognitiveservices.azure.com/.default"],
        docs: "https://learn.microsoft.com/en-us/azure/ai-services/openai/how-to/managed-identity",
    },
    Provider {
        name: "bedrock",
        title: "Amazon Bedrock (runtime, agents, control plane)",
        hosts: &[
            "bedrock-runtime.*.amazonaws.com",
            "bedrock-runtime-fips.*.amazonaws.com",
            "bedrock-agent-runtime.*.amazonaws.com",
            "bedrock-agent.*.amazonaws.com",
            "bedrock.*.amazonaws.com",
        ],
        auth: Auth::SigV4 { service: "bedrock" },
        headers: &[],
        scopes: &[],
        docs: "https://docs.aws.amazon.com/general/latest/gr/bedrock.html",
    },
    Provider {
        name: "cohere",
        title: "Cohere API",
        hosts: &["api.cohere.com", "api.cohere.ai"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.cohere.com/reference/about",
    },
    Provider {
        name: "deepgram",
        title: "Deepgram speech API",
        hosts: &["api.deepgram.com"],
        auth: Auth::Header {
            name: "authorization",
            value: "Token {token}",
        },
        headers: &[],
        scopes: &[],
        docs: "https://developers.deepgram.com/guides/fundamentals/authenticating",
    },
    Provider {
        name: "deepseek",
        title: "DeepSeek API",
        hosts: &["api.deepseek.com"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://api-docs.deepseek.com/",
    },
    Provider {
        name: "elevenlabs",
        title: "ElevenLabs API",
        hosts: &["api.elevenlabs.io"],
        auth: Auth::Header {
            name: "xi-api-key",
            value: "{token}",
        },
        headers: &[],
        scopes: &[],
        docs: "https://elevenlabs.io/docs/api-reference/authentication",
    },
    Provider {
        name: "fireworks",
        title: "Fireworks AI API",
        hosts: &["api.fireworks.ai"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.fireworks.ai/api-reference/introduction",
    },
    Provider {
        name: "gemini",
        title: "Google Gemini API (AI Studio key)",
        hosts: &["generativelanguage.googleapis.com"],
        auth: Auth::Header {
            name: "x-goog-api-key",
            value: "{token}",
        },
        headers: &[],
        scopes: &[],
        docs: "https://ai.google.dev/gemini-api/docs/api-key",
    },
    Provider {
        name: "github",
        title: "GitHub REST API and GitHub Models",
        hosts: &["api.github.com", "models.github.ai"],
        auth: bearer(),
        headers: &[("x-github-api-version", "2022-11-28")],
        scopes: &[],
        docs: "https://docs.github.com/en/rest/about-the-rest-api/api-versions",
    },
    Provider {
        name: "groq",
        title: "Groq API",
        hosts: &["api.groq.com"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://console.groq.com/docs/api-reference",
    },
    Provider {
        name: "huggingface",
        title: "Hugging Face Inference Providers, Inference API and Hub",
        hosts: &[
            "router.huggingface.co",
            "api-inference.huggingface.co",
            "huggingface.co",
        ],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://huggingface.co/docs/inference-providers/index",
    },
    Provider {
        name: "mistral",
        title: "Mistral AI API",
        hosts: &["api.mistral.ai", "codestral.mistral.ai"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.mistral.ai/api/",
    },
    Provider {
        name: "notion",
        title: "Notion API",
        hosts: &["api.notion.com"],
        auth: bearer(),
        headers: &[("notion-version", "2022-06-28")],
        scopes: &[],
        docs: "https://developers.notion.com/reference/versioning",
    },
    Provider {
        name: "openai",
        title: "OpenAI API",
        hosts: &["api.openai.com"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://platform.openai.com/docs/api-reference/authentication",
    },
    Provider {
        name: "openrouter",
        title: "OpenRouter API",
        hosts: &["openrouter.ai"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://openrouter.ai/docs/api-reference/authentication",
    },
    Provider {
        name: "perplexity",
        title: "Perplexity API",
        hosts: &["api.perplexity.ai"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.perplexity.ai/",
    },
    Provider {
        name: "slack",
        title: "Slack Web API",
        hosts: &["slack.com"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://api.slack.com/web",
    },
    Provider {
        name: "together",
        title: "Together AI API",
        hosts: &["api.together.xyz"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.together.ai/reference/authentication-1",
    },
    Provider {
        name: "vertex",
        title: "Google Vertex AI (OAuth token: GCP workload identity federation)",
        hosts: &["aiplatform.googleapis.com", "*-aiplatform.googleapis.com"],
        auth: bearer(),
        headers: &[],
        scopes: &["https://www.googleapis.com/auth/cloud-platform"],
        docs: "https://cloud.google.com/vertex-ai/docs/reference/rest",
    },
    Provider {
        name: "voyage",
        title: "Voyage AI API",
        hosts: &["api.voyageai.com"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.voyageai.com/reference/embeddings-api",
    },
    Provider {
        name: "xai",
        title: "xAI Grok API",
        hosts: &["api.x.ai"],
        auth: bearer(),
        headers: &[],
        scopes: &[],
        docs: "https://docs.x.ai/docs/api-reference",
    },
];

/// The entry named `name`.
pub(crate) fn find(name: &str) -> Option<&'static Provider> {
    CATALOG.iter().find(|p| p.name == name)
}

/// The names, for an error message.
pub(crate) fn names() -> String {
    CATALOG
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{HostMatch, InjectSpec};

    /// Every entry is usable: unique names in order, valid host patterns and headers,
    /// a well-formed inject template, an https docs address.
    #[test]
    fn every_entry_is_well_formed() {
        let mut names: Vec<_> = CATALOG.iter().map(|p| p.name).collect();
        let listed = names.clone();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names, listed, "sorted and unique");
        for p in CATALOG {
            assert!(!p.hosts.is_empty(), "{}", p.name);
            for h in p.hosts {
                HostMatch::parse(h).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            }
            if let Auth::Header { name, value } = p.auth {
                InjectSpec::parse(Some(name), None, value)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            }
            for (k, v) in p.headers {
                http::HeaderName::from_static(k);
                http::HeaderValue::from_static(v);
            }
            assert!(p.docs.starts_with("https://"), "{}", p.name);
        }
        for must in [
            "openai",
            "anthropic",
            "azure_openai",
            "bedrock",
            "vertex",
            "gemini",
            "mistral",
            "cohere",
            "groq",
            "huggingface",
            "github",
            "slack",
        ] {
            assert!(find(must).is_some(), "{must}");
        }
    }

    /// The hosts each vendor documents are matched; look-alikes are not.
    #[test]
    fn documented_hosts_match() {
        let takes = |p: &str, host: &str| {
            find(p)
                .unwrap()
                .hosts
                .iter()
                .any(|h| HostMatch::parse(h).unwrap().matches(host))
        };
        assert!(takes("bedrock", "bedrock-runtime.us-east-1.amazonaws.com"));
        assert!(takes(
            "bedrock",
            "bedrock-agent-runtime.eu-west-3.amazonaws.com"
        ));
        assert!(takes(
            "bedrock",
            "bedrock-runtime-fips.us-gov-west-1.amazonaws.com"
        ));
        assert!(!takes("bedrock", "s3.us-east-1.amazonaws.com"));
        assert!(!takes(
            "bedrock",
            "bedrock-runtime.us-east-1.amazonaws.com.evil.example"
        ));
        assert!(takes("vertex", "us-central1-aiplatform.googleapis.com"));
        assert!(takes("vertex", "aiplatform.googleapis.com"));
        assert!(!takes("vertex", "storage.googleapis.com"));
        assert!(takes("azure_openai", "my-resource.openai.azure.com"));
        assert!(!takes("azure_openai", "openai.azure.com"));
        assert!(takes("openai", "api.openai.com"));
        assert!(!takes("openai", "api.openai.com.evil.example"));
    }
}

"""The official SDKs against routes that name a `provider:` (tests/sdks.rs): the `anthropic`
SDK and the `openai` SDK's `AzureOpenAI` client, each through the proxy with interception, each
sending the app's own key, which the proxy must replace in the shape the vendor documents.

Usage: python3 provider_clients.py PROXY CA TLS_PORT ANTHROPIC_KEY AZURE_KEY

Prints `NAME JSON` per call, the JSON holding what the server saw (`seen`).
"""

import json
import sys

import anthropic
import httpx
import openai

proxy, ca, tls_port, anthropic_key, azure_key = sys.argv[1:6]
TLS = f"https://localhost:{tls_port}"
MESSAGES = [{"role": "user", "content": "hello"}]


claude = anthropic.Anthropic(
    base_url=TLS,
    api_key=anthropic_key,
    http_client=anthropic.DefaultHttpxClient(proxy=proxy, verify=ca, timeout=20),
    max_retries=0,
)
r = claude.messages.create(model="claude-test", max_tokens=16, messages=MESSAGES)
print("anthropic", json.dumps({"seen": json.loads(r.content[0].text)}), flush=True)

# Azure OpenAI as its docs show it: a resource endpoint, a deployment, an api-version, and a
# key in the `api-key` header.
azure = openai.AzureOpenAI(
    azure_endpoint=TLS,
    api_key=azure_key,
    api_version="2024-10-21",
    http_client=httpx.Client(proxy=proxy, verify=ca, timeout=20),
    max_retries=0,
)
r = azure.chat.completions.create(model="gpt-4o-prod", messages=MESSAGES)
print("azure", json.dumps({"seen": json.loads(r.choices[0].message.content)}), flush=True)

"""The official model SDKs and the common Python HTTP clients, through Chaperone to
fake_llm.py, as an app would configure them (tests/sdks.rs runs this with the venv's Python).

Usage: python3 sdk_clients.py PROXY CA TLS_PORT PLAIN_PORT OPENAI_KEY ANTHROPIC_KEY

Prints one line per call: `NAME JSON`, the JSON holding what the server saw (`seen`), and for
streams how many parts arrived and how far apart the first and last were (`spread_ms`).
Every call sends the app's own key, which the proxy must strip and replace.
"""

import asyncio
import json
import ssl
import sys
import time

import aiohttp
import anthropic
import httpx
import openai

proxy, ca, tls_port, plain_port, openai_key, anthropic_key = sys.argv[1:7]
proxy_port = proxy.rsplit(":", 1)[1]
TLS = f"https://localhost:{tls_port}"
PLAIN = f"http://127.0.0.1:{plain_port}"
MESSAGES = [{"role": "user", "content": "hello"}]


def report(name, seen, parts=None, times=None):
    out = {"seen": json.loads(seen)}
    if times is not None:
        out["parts"] = parts
        out["spread_ms"] = (times[-1] - times[0]) * 1000
    print(name, json.dumps(out), flush=True)


# The purpose each call names (`chaperone-purpose`), so the log can tell streams apart.
CALL = {"chaperone-purpose": "call"}
STREAM = {"chaperone-purpose": "stream"}


def openai_calls(name, client):
    r = client.chat.completions.create(model="gpt-test", messages=MESSAGES, extra_headers=CALL)
    report(name, r.choices[0].message.content)
    texts, times = [], []
    for chunk in client.chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, extra_headers=STREAM
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            texts.append(chunk.choices[0].delta.content)
            times.append(time.monotonic())
    report(name + "-stream", texts[0], len(texts), times)


def anthropic_calls(name, client):
    r = client.messages.create(model="claude-test", max_tokens=16, messages=MESSAGES, extra_headers=CALL)
    report(name, r.content[0].text)
    texts, times = [], []
    with client.messages.stream(
        model="claude-test", max_tokens=16, messages=MESSAGES, extra_headers=STREAM
    ) as s:
        for text in s.text_stream:
            texts.append(text)
            times.append(time.monotonic())
    report(name + "-stream", texts[0], len(texts), times)


def sdks():
    # openai: its http_client is an httpx.Client; through HTTPS_PROXY-style CONNECT
    # (intercepted, HTTP/2 to the upstream) and HTTP_PROXY-style absolute form.
    for name, base in (("openai-https", TLS), ("openai-http", PLAIN)):
        http = httpx.Client(proxy=proxy, verify=ca, timeout=20)
        openai_calls(name, openai.OpenAI(base_url=base + "/v1", api_key=openai_key, http_client=http, max_retries=0))
    # Reverse mode: the base URL points at the sidecar, the Host names the upstream.
    http = httpx.Client(timeout=20, headers={"Host": f"127.0.0.1:{plain_port}"})
    base = f"http://127.0.0.1:{proxy_port}/v1"
    openai_calls("openai-reverse", openai.OpenAI(base_url=base, api_key=openai_key, http_client=http, max_retries=0))
    # anthropic: its DefaultHttpxClient takes the proxy and the CA.
    for name, base in (("anthropic-https", TLS), ("anthropic-http", PLAIN)):
        http = anthropic.DefaultHttpxClient(proxy=proxy, verify=ca, timeout=20)
        anthropic_calls(name, anthropic.Anthropic(base_url=base, api_key=anthropic_key, http_client=http, max_retries=0))


def httpx_http2():
    with httpx.Client(proxy=proxy, verify=ca, http2=True, timeout=20) as c:
        r = c.get(TLS + "/echo", headers={"Authorization": "Bearer " + openai_key, **CALL})
        assert r.http_version == "HTTP/2", r.http_version
        report("httpx-http2", r.text)
        times, first = [], None
        with c.stream("GET", TLS + "/sse", headers={"Authorization": "Bearer " + openai_key, **STREAM}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first = first or line[6:]
                    times.append(time.monotonic())
        report("httpx-http2-sse", first, len(times), times)


async def aiohttp_calls():
    trust = ssl.create_default_context(cafile=ca)
    headers = {"Authorization": "Bearer " + openai_key}
    async with aiohttp.ClientSession() as s:
        for name, base in (("aiohttp-https", TLS), ("aiohttp-http", PLAIN)):
            async with s.get(base + "/echo", proxy=proxy, ssl=trust, headers={**headers, **CALL}) as r:
                assert r.status == 200, r.status
                report(name, await r.text())
            times, first = [], None
            async with s.get(base + "/sse", proxy=proxy, ssl=trust, headers={**headers, **STREAM}) as r:
                async for line in r.content:
                    line = line.decode().strip()
                    if line.startswith("data: "):
                        first = first or line[6:]
                        times.append(time.monotonic())
            report(name + "-sse", first, len(times), times)


sdks()
httpx_http2()
asyncio.run(aiohttp_calls())

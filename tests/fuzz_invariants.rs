//! The fuzz targets' invariants (`src/fuzzing.rs`) on pseudo-random input built from the
//! pieces hostile heads and broken configs are made of, so CI checks them on stable without
//! libFuzzer: `cargo +nightly fuzz run request_head` (or `config`) explores further.

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

/// Splice pieces into inputs, with a byte flipped now and then.
fn inputs(seed: u64, n: usize, pieces: &[&str], each: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let k = 1 + (rng.next() % each as u64) as usize;
            let mut s = String::new();
            for _ in 0..k {
                s.push_str(pieces[rng.range(0, pieces.len() - 1)]);
            }
            let mut b = s.into_bytes();
            if i % 5 == 0 && !b.is_empty() {
                let at = (rng.next() % b.len() as u64) as usize;
                b[at] = (rng.next() & 0xff) as u8;
            }
            b
        })
        .collect()
}

#[test]
fn request_heads_keep_their_invariants() {
    const PIECES: &[&str] = &[
        "GET\n",
        "POST\n",
        "CONNECT\n",
        "http://",
        "https://",
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
        "[64:ff9b::a9fe:a9fe]",
        "0177.0.0.1",
        "localhost",
        "api.example.org",
        ":8080",
        ":0",
        "/",
        "/..",
        "/.",
        "/%2e%2e",
        "/%2F",
        "%5c",
        "\\",
        "/%00",
        "%7E",
        "%41",
        "/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
        "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "?a=1&glpat-Xk3vR8pQ2mN7wZ4tY9aB",
        "\n",
        "chaperone-purpose: ",
        "chaperone-request-id: ",
        "tool:search",
        "sk-proj-Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_Zx9_",
        "mcp-method: tools/call",
        "mcp-name: x",
        "cookie: lang=Jos\u{e9}; k=xoxb-2048193847562-3917462058134-Qw7Rt2Yp9Lk4Xz8Vb3Nm6Hs1",
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"a\",\"arguments\":{\"repo\":[1]}}}",
        "[{\"method\":\"tools/list\"},{\"id\":2,\"result\":{}}]",
        "{",
        "]",
        "\u{202e}",
        "é",
    ];
    for input in inputs(0x5eed_1234, 20_000, PIECES, 12) {
        chaperone::fuzzing::request_head(&input);
    }
}

#[test]
fn config_errors_always_say_where() {
    const PIECES: &[&str] = &[
        "listen: ",
        "127.0.0.1:0",
        "admin: ",
        "\n",
        "  ",
        "- ",
        "identity:\n",
        "id: spiffe://t/a\n",
        "workload: w\n",
        "environment: e\n",
        "routes:\n",
        "  - name: r\n",
        "    match: { host: a.example }\n",
        "    mcp: true\n",
        "    tools: { t: [s] }\n",
        "    tools: { t: { arguments: { x: Nope } } }\n",
        "credentials:\n",
        "  c: { kind: jwt, ttl: 60s }\n",
        "  c: { kind: static }\n",
        "{",
        "}",
        "[",
        "]",
        ": ",
        "'",
        "\"",
        "&anchor ",
        "*anchor",
        "!!binary ",
        "max_connections: 0\n",
        "workers: 999\n",
        "timeouts: { idle: forever }\n",
        "policy: { file: /nonexistent.cedar }\n",
        "\t",
        "#",
    ];
    for input in inputs(0xc0f1_9000, 4_000, PIECES, 16) {
        chaperone::fuzzing::config(&input);
    }
}

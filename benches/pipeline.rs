//! Micro-benchmarks of the per-request stages: strip, policy decision, per-call mint.
//! Run: `cargo bench --bench pipeline`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};

use chaperone::config::{Identity, PolicySource, StripMode};
use chaperone::credentials::{JwtMinter, JwtSpec, MintRequest};
use chaperone::fingerprint::Fingerprinter;
use chaperone::policy::{PolicyEngine, PolicyInput};
use chaperone::strip;

/// A typical app request head: 12 headers, one of them a hard-coded key.
fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    let key = format!("Bearer sk-proj-{}", "Ab1_Cd2-Ef3_Gh4-".repeat(3));
    for (k, v) in [
        ("host", "api.openai.com"),
        ("user-agent", "python-requests/2.32.3"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("x-request-id", "550e8400-e29b-41d4-a716-446655440000"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("openai-organization", "org-abc123"),
        ("x-stainless-lang", "python"),
        (
            "if-none-match",
            "\"33a64df551425fcc55e4d42a148795d9f25f89d4\"",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h.insert("authorization", HeaderValue::from_str(&key).unwrap());
    h
}

fn identity() -> Identity {
    Identity {
        id: "spiffe://example.org/ns/ml/sa/inference".into(),
        workload: "inference-api".into(),
        stage: "main".into(),
        environment: "prod".into(),
    }
}

fn bench_strip(c: &mut Criterion) {
    let fp = Fingerprinter::random();
    let headers = typical_headers();
    c.bench_function("strip/typical_request_12_headers", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |h| {
                black_box(strip::inspect(
                    &fp,
                    StripMode::Strip,
                    h,
                    Some("model=gpt-4o&stream=true"),
                    None,
                ))
            },
            BatchSize::SmallInput,
        )
    });
    let clean = {
        let mut h = typical_headers();
        h.remove("authorization");
        h
    };
    c.bench_function("strip/clean_request_11_headers", |b| {
        b.iter_batched_ref(
            || clean.clone(),
            |h| black_box(strip::inspect(&fp, StripMode::Strip, h, None, None)),
            BatchSize::SmallInput,
        )
    });
}

fn policy_text(n: usize) -> String {
    let mut s = String::from(
        "@id(\"inference-openai\")\npermit(principal, action == Action::\"POST\", resource == Destination::\"api.openai.com\") when { context.purpose == \"answer-question\" && principal.environment == \"prod\" };\n",
    );
    for i in 1..n {
        s.push_str(&format!(
            "@id(\"p{i}\")\npermit(principal, action == Action::\"GET\", resource == Destination::\"svc{i}.internal\") when {{ context.purpose == \"p{i}\" && resource.labels has sensitivity }};\n"
        ));
    }
    s.push_str("@id(\"no-export\")\nforbid(principal, action, resource) when { context.purpose == \"export-data\" };\n");
    s
}

fn bench_policy(c: &mut Criterion) {
    let id = identity();
    let labels = BTreeMap::from([("sensitivity".to_string(), "high".to_string())]);
    for n in [1, 100] {
        let engine = PolicyEngine::compile(&PolicySource {
            origin: "bench".into(),
            text: policy_text(n),
            schema: None,
        })
        .unwrap();
        c.bench_function(&format!("policy/decide_{n}_policies"), |b| {
            b.iter(|| {
                let d = engine.decide(black_box(&PolicyInput {
                    identity: &id,
                    action: "POST",
                    host: "api.openai.com",
                    scheme: "https",
                    port: 443,
                    path: "/v1/chat/completions",
                    purpose: "answer-question",
                    route: "openai",
                    labels: Some(&labels),
                    stripped_types: &["openai_project_key"],
                    credential: "per-call",
                }));
                assert!(d.allow);
                d
            })
        });
    }
}

fn bench_mint(c: &mut Criterion) {
    let m = JwtMinter::new(&JwtSpec {
        name: "per-call".into(),
        ttl: Duration::from_secs(60),
        issuer: "spiffe://example.org/ns/ml/sa/inference".into(),
        key_pem: None,
    })
    .unwrap();
    let scopes = vec!["model.invoke".to_string()];
    let req = MintRequest {
        subject: "spiffe://example.org/ns/ml/sa/inference",
        audience: "https://api.openai.com",
        resource: None,
        txn: "550e8400-e29b-41d4-a716-446655440000",
        scopes: &scopes,
        workload: "inference-api",
        stage: "main",
        environment: "prod",
        purpose: "answer-question",
        method: "POST",
        host: "api.openai.com",
        path: "/v1/chat/completions",
    };
    c.bench_function("credential/mint_per_call_jwt_ed25519", |b| {
        b.iter(|| black_box(m.mint(&req).unwrap()))
    });

    // For comparison: jsonwebtoken::encode, which re-parses the key on every call.
    let pkcs8 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_der(&pkcs8.serialize_der());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    let claims = serde_json::json!({"sub": "spiffe://example.org/ns/ml/sa/inference", "aud": "https://api.openai.com", "exp": 2_000_000_000u64});
    c.bench_function(
        "credential/jsonwebtoken_encode_ed25519_for_comparison",
        |b| b.iter(|| black_box(jsonwebtoken::encode(&header, &claims, &key).unwrap())),
    );
}

fn bench_leaf(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = chaperone::tls::init_ca(dir.path(), 2, false).unwrap();
    let issuer = chaperone::tls::LeafIssuer::from_pem(
        &std::fs::read_to_string(cert).unwrap(),
        &std::fs::read_to_string(key).unwrap(),
    )
    .unwrap();
    // A new host: key generation and signing, what the first CONNECT to a host pays.
    c.bench_function("tls/issue_leaf_new_host", |b| {
        b.iter(|| black_box(issuer.issue("api.example.org").unwrap()))
    });
}

criterion_group!(benches, bench_strip, bench_policy, bench_mint, bench_leaf);
criterion_main!(benches);

#!/usr/bin/env python3
"""Write N synthetic purpose-log lines (default 1,000,000) shaped like the sidecar's, for
timing `chaperone audit`: 3 stages, 42 destinations, 5% denials, 2% of requests carrying one
of 50 hard-coded keys, a per-call token on every allowed request.

    python3 benches/audit_log.py /tmp/million.log [N]
    /usr/bin/time -v target/release/chaperone audit /tmp/million.log > /dev/null
"""
import json
import random
import sys

path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
random.seed(7)
stages = ("serving", "training", "retrieval")
ids = [f"spiffe://example.org/ns/ml/sa/{s}" for s in stages]
hosts = [f"svc{i}.internal" for i in range(40)] + ["api.openai.com", "llm.internal.example.org"]
purposes = ["inference", "answer-question", "training", "retrieve-context"]
with open(path, "w") as f:
    for i in range(n):
        st = random.randrange(3)
        host = random.choice(hosts)
        deny = random.random() < 0.05
        rec = {
            "ts": "2026-11-24T%02d:%02d:%02d.%03dZ" % (i // 360000 % 24, i // 6000 % 60, i // 100 % 60, i % 1000),
            "request_id": "550e8400-e29b-41d4-a716-%012d" % i, "trace_id": None,
            "identity": ids[st], "workload": "support-assistant", "stage": stages[st], "environment": "prod",
            "purpose": random.choice(purposes), "kind": "forward", "method": "POST", "scheme": "https",
            "host": host, "port": 443, "path": "/v1/chat/completions", "query": None, "route": "r" + host,
            "decision": "deny" if deny else "allow",
            "reason": "no policy permits this request" if deny else "permitted by p1",
            "policy_ids": [] if deny else ["p1"],
            "credential": None if deny else {
                "name": "per-call", "kind": "jwt", "id": "%032x" % random.getrandbits(128),
                "expires_at": 1795544436, "scopes": ["model.invoke", "purpose:inference"]},
            "stripped": [{"type": "openai_project_key", "location": "header:authorization",
                          "fingerprint": "%012x" % random.randrange(50)}] if random.random() < 0.02 else [],
            "strip_mode": "strip", "status": 403 if deny else 200, "duration_ms": 1.2, "upstream_ms": 0.8,
            "error": "policy_denied" if deny else None, "client": "127.0.0.1:40000",
            "bytes_out": 512, "bytes_in": None,
        }
        f.write(json.dumps(rec, separators=(",", ":")) + "\n")

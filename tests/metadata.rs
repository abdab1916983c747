//! The metadata guardrail against the real address. 169.254.169.254 is served in a network
//! namespace beyond the pod; `metadata.google.internal`, and a name that only resolves there,
//! reach it through the pod's /etc/hosts; the real sidecar runs in the pod. A permit
//! annotated `@guardrail("metadata")` lifts the guardrail for the metadata name and the
//! address, and for the paths it names only; a name that merely resolves to the address
//! stays refused.
//!
//! Needs what `common::netns` needs (root, iproute2, setpriv, /usr/bin/python3).

mod common;

use common::netns::*;
use common::*;

const HOSTS: &str = "127.0.0.1 localhost
169.254.169.254 metadata.google.internal
169.254.169.254 rebound.example.org
";

const CONFIG: &str = r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/inference
  workload: inference
  environment: test
routes:
  - name: metadata-by-name
    match: { host: metadata.google.internal, port: 80 }
    purpose_default: bootstrap
  - name: metadata-by-address
    match: { host: 169.254.169.254, port: 80 }
    purpose_default: bootstrap
  - name: rebound
    match: { host: rebound.example.org, port: 80 }
    purpose_default: bootstrap
"#;

#[test]
fn a_metadata_lift_works_by_name_and_address_and_never_for_a_rebound_name() {
    let p = Pod::with_hosts("m", HOSTS);
    let _metadata = p.serve(&p.net, ROOT, &["tcp,169.254.169.254,80"]);
    let policy = format!(
        "{PERMISSIVE_POLICY}
@id(\"bootstrap-reads-instance-metadata\")
@guardrail(\"metadata\")
permit(principal, action == Action::\"GET\", resource) when {{ context.guardrail == \"metadata\" && context.path like \"/computeMetadata/v1/instance/*\" }};
"
    );
    let sc = p.sidecar(ROOT, CONFIG, &policy);
    let proxy = sc.proxy_url();
    let get = |url: &str| {
        p.curl(
            ROOT,
            &[
                "-x",
                &proxy,
                "-w",
                "\n%{http_code}",
                "-H",
                "Metadata-Flavor: Google",
                url,
            ],
        )
        .1
    };

    // Lifted: by the metadata name (resolved through the guarded resolver) and by address.
    let by_name = get("http://metadata.google.internal/computeMetadata/v1/instance/id");
    assert_eq!(by_name, "upstream-ok\n200");
    let by_address = get("http://169.254.169.254/computeMetadata/v1/instance/id");
    assert_eq!(by_address, "upstream-ok\n200");

    // Not lifted: a path the permit does not name.
    let other_path = get("http://metadata.google.internal/computeMetadata/v1/project/attributes/");
    assert!(other_path.ends_with("\n403"), "{other_path}");
    assert!(other_path.contains("metadata"), "{other_path}");

    // Never lifted: a name that is not a metadata name but resolves to the address (DNS
    // rebinding), even on a path the permit names.
    let rebound = get("http://rebound.example.org/computeMetadata/v1/instance/id");
    assert!(rebound.ends_with("\n403"), "{rebound}");
    assert!(rebound.contains("guardrail"), "{rebound}");
    assert!(!rebound.contains("upstream-ok"), "{rebound}");

    let lines = sc.log_lines(4);
    let decisions: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["route"].as_str().unwrap_or(""),
                l["decision"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("metadata-by-name", "allow"),
            ("metadata-by-address", "allow"),
            ("metadata-by-name", "deny"),
            ("rebound", "deny"),
        ],
        "{lines:?}"
    );
    // Refused by the guardrail after policy permitted the name: the line says so, and names
    // no permit.
    let rebound = &lines[3];
    let reason = rebound["reason"].as_str().unwrap_or("");
    assert!(reason.contains("guardrail"), "{rebound}");
    assert!(!reason.contains("permitted by"), "{rebound}");
    assert_eq!(rebound["policy_ids"], serde_json::json!([]), "{rebound}");
}

//! `deploy/`: every Kustomize target renders with real kustomize (kubectl's), validates
//! offline with PyPI `kubernetes-validate --strict`, carries a Chaperone config whose policy
//! validates, and agrees with that config (ports, probes, the admitted UID, the token path).
//!
//! The tools come from `.ci/run` (a venv in `target/k8s-tools`), or from PATH.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Render a target and return its objects as JSON.
fn render(target: &str, dir: &Path) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(target);
    let yaml = must(
        Command::new(k8s_tool("kubectl"))
            .arg("kustomize")
            .arg(&root),
    );
    let file = dir.join(format!("{}.yaml", target.replace('/', "-")));
    std::fs::write(&file, &yaml).unwrap();
    let out = must(
        Command::new(k8s_tool("kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .arg(&file),
    );
    assert!(!out.contains("ERROR"), "{target}: {out}");
    let json = must(Command::new(k8s_tool("python3")).args([
        "-c",
        "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
    ]).arg(&file));
    serde_json::from_str(&json).unwrap()
}

fn kind<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
}

#[test]
fn every_deploy_target_renders_validates_and_agrees_with_its_config() {
    let dir = tempfile::tempdir().unwrap();
    for target in ["base", "overlays/dev", "overlays/prod"] {
        let objs = render(target, dir.path());
        let cm = kind(&objs, "ConfigMap");
        let dep = kind(&objs, "Deployment");
        let pod = &dep["spec"]["template"]["spec"];

        // The config and policy as mounted: the policy validates against the shipped schema.
        let cfg_dir = dir.path().join(target.replace('/', "-"));
        std::fs::create_dir_all(&cfg_dir).unwrap();
        for (k, v) in cm["data"].as_object().unwrap() {
            std::fs::write(cfg_dir.join(k), v.as_str().unwrap()).unwrap();
        }
        let cfg_path = cfg_dir.join("chaperone.yaml");
        let (ok, out, err) = run(Command::new(bin())
            .args(["policy", "check", "--config"])
            .arg(&cfg_path));
        assert!(ok, "{target}: {err}{out}");
        let cfg_text = std::fs::read_to_string(&cfg_path).unwrap();

        // Chaperone is a native sidecar: an init container that keeps running, first but for
        // the egress lock (prod), so it is up before any other.
        let inits = pod["initContainers"].as_array().unwrap();
        let locked = target == "overlays/prod";
        let side = &inits[usize::from(locked)];
        assert_eq!(side["name"], "chaperone", "{target}");
        assert_eq!(side["restartPolicy"], "Always", "{target}");
        assert_eq!(side["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(side["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert!(
            cfg_text.contains("admin: 0.0.0.0:15000"),
            "probes reach the admin port on the pod IP"
        );
        assert!(cfg_text.contains("listen: 127.0.0.1:15001"));
        let sc = &side["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        assert!(side["resources"]["limits"]["memory"].is_string());

        // The app goes through it, trusts its CA, and runs as the one UID it admits.
        let app = &pod["containers"][0];
        for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            assert_eq!(
                env(app, var),
                Some("http://127.0.0.1:15001"),
                "{target} {var}"
            );
        }
        assert!(env(app, "NO_PROXY").is_some());
        assert_eq!(env(app, "SSL_CERT_FILE"), Some("/etc/chaperone/ca/ca.pem"));
        let uid = app["securityContext"]["runAsUser"].as_u64().unwrap();
        assert!(
            cfg_text.contains(&format!("callers: {{ uids: [{uid}] }}")),
            "{target}: the app's UID {uid} is the admitted caller"
        );
        assert_ne!(
            uid,
            sc["runAsUser"].as_u64().unwrap(),
            "app and sidecar are different users"
        );
        // The app sees the CA certificate only, never its key.
        let app_vol = app["volumeMounts"][0]["name"].as_str().unwrap();
        let vol = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == app_vol)
            .unwrap();
        assert_eq!(vol["secret"]["items"].as_array().unwrap().len(), 1);
        assert_eq!(vol["secret"]["items"][0]["key"], "ca.pem");
        assert_eq!(pod["automountServiceAccountToken"], false);

        // The projected token has an audience and lands where the config reads it.
        let token = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_object())
            .expect("a projected service-account token");
        assert!(token["audience"].is_string());
        let mount = side["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "workload-token")
            .unwrap()["mountPath"]
            .as_str()
            .unwrap();
        assert!(
            cfg_text.contains(&format!(
                "subject_token_file: {mount}/{}",
                token["path"].as_str().unwrap()
            )),
            "{target}"
        );

        if locked {
            egress_lock_is_first_and_exempts_the_sidecar(&inits[0], side, uid);
        } else {
            assert!(
                !inits.iter().any(|c| c["name"] == "chaperone-egress-lock"),
                "{target}"
            );
        }

        // A NetworkPolicy confines the pod's egress.
        let np = kind(&objs, "NetworkPolicy");
        assert!(
            np["spec"]["policyTypes"]
                .as_array()
                .unwrap()
                .contains(&Value::from("Egress"))
        );
    }
}

/// The egress lock: a run-once init container with NET_ADMIN and nothing else, exempting the
/// sidecar's UID and not the app's, with arguments the real binary accepts.
fn egress_lock_is_first_and_exempts_the_sidecar(lock: &Value, sidecar: &Value, app_uid: u64) {
    assert_eq!(lock["name"], "chaperone-egress-lock");
    assert!(
        lock["restartPolicy"].is_null(),
        "runs once, before the sidecar"
    );
    assert!(
        lock["image"]
            .as_str()
            .unwrap()
            .contains("egress-lock@sha256:")
    );
    let sc = &lock["securityContext"];
    assert_eq!(sc["capabilities"]["add"], serde_json::json!(["NET_ADMIN"]));
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let args = strs(&lock["args"]);
    let exempt: Vec<u64> = args
        .windows(2)
        .filter(|w| w[0] == "--proxy-uid")
        .map(|w| w[1].parse().unwrap())
        .collect();
    assert_eq!(
        exempt,
        [sidecar["securityContext"]["runAsUser"].as_u64().unwrap()]
    );
    assert!(!exempt.contains(&app_uid));
    let (ok, out, err) = run(Command::new(bin()).arg("egress-lock").args(&args).args([
        "--print",
        "--resolv-conf",
        "/dev/null",
    ]));
    assert!(ok && out.contains("--uid-owner 65532"), "{err}{out}");
}

/// The webhook's own manifests: valid, its config loads, and what the Deployment, Service
/// and MutatingWebhookConfiguration say agree.
#[test]
fn the_webhook_manifests_render_validate_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let objs = render("inject", dir.path());
    let cm = kind(&objs, "ConfigMap");
    let file = dir.path().join("inject.yaml");
    std::fs::write(&file, cm["data"]["inject.yaml"].as_str().unwrap()).unwrap();
    let cfg = chaperone::cli::webhook::InjectConfig::load(&file).unwrap();
    assert!(cfg.image.contains("@sha256:"), "pinned by digest");

    let dep = kind(&objs, "Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    assert_eq!(args[0], "inject");
    let mounts = c["volumeMounts"].as_array().unwrap();
    let mounted = |path: &str| {
        mounts
            .iter()
            .any(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
    };
    for flag in ["--config=", "--tls-cert=", "--tls-key="] {
        let path = args.iter().find_map(|a| a.strip_prefix(flag)).unwrap();
        assert!(mounted(path), "{flag}{path} is on a mounted volume");
    }
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);

    let hook = &kind(&objs, "MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(hook["admissionReviewVersions"][0], "v1");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    let svc = kind(&objs, "Service");
    assert_eq!(
        hook["clientConfig"]["service"]["name"],
        svc["metadata"]["name"]
    );
    assert_eq!(
        hook["clientConfig"]["service"]["namespace"],
        svc["metadata"]["namespace"]
    );
    assert_eq!(hook["rules"][0]["resources"][0], "pods");
    assert!(hook["namespaceSelector"]["matchLabels"]["chaperone.dev/injection"].is_string());
}

//! `chaperone egress-lock` on a real kernel. Two network namespaces joined by a veth pair
//! stand for a pod and the network beyond it. The real binary writes the lock into the
//! pod's namespace with iptables-restore, the real sidecar runs there as its own UID, and
//! connections are made as the app's UID, the sidecar's and root's, over IPv4, IPv6 and UDP.
//!
//! Needs root and iptables besides what `common::netns` needs; `.ci/run` installs them.

mod common;

use common::netns::*;
use common::*;

/// `chaperone egress-lock` in the pod: as root with only the capability the manifests
/// grant (NET_ADMIN), or as `uid`: (success, stderr).
fn lock(p: &Pod, uid: &str, args: &[&str]) -> (bool, String) {
    let mut c = p.cmd(&p.pod, uid, "setpriv");
    c.args(["--bounding-set", "-all,+net_admin", "--inh-caps", "-all"]);
    let (ok, _, err) = run(c.arg(bin()).arg("egress-lock").args(args));
    (ok, err)
}

fn rules(p: &Pod, tool: &str) -> String {
    must(p.cmd(&p.pod, ROOT, tool).arg("-S"))
}

const CONFIG: &str = r#"listen: 127.0.0.1:0
admin: 127.0.0.1:0
identity:
  id: spiffe://test.local/ns/ml/sa/app
  workload: app
  environment: test
  callers: { uids: [10001] }
routes:
  - name: upstream
    match: { host: 10.77.0.2, port: 8080 }
    purpose_default: inference
"#;

#[test]
fn with_the_lock_the_app_gets_out_only_through_the_sidecar() {
    let p = Pod::new("a");
    let _upstream = p.serve(
        &p.net,
        ROOT,
        &[
            "tcp,10.77.0.2,8080",
            "tcp,10.78.0.2,8080",
            "tcp,fd00:77::2,8080",
            "udp,10.77.0.2,53",
            "udp,10.77.0.2,5353",
        ],
    );
    // The app serves its own clients too.
    let _app_server = p.serve(&p.pod, APP, &["tcp,10.77.0.1,9000"]);
    let direct = "http://10.77.0.2:8080/direct";

    // Before the lock the app reaches the upstream directly: what follows is the lock's doing.
    assert_eq!(p.curl(APP, &[direct]), (0, "upstream-ok".into()));
    assert_eq!(p.udp(APP, "10.77.0.2", 5353), "ping");

    let (_dir, resolv) = temp_file(
        "resolv.conf",
        "search ml.svc.cluster.local\nnameserver 10.77.0.2\n",
    );
    let (ok, err) = lock(
        &p,
        ROOT,
        &[
            "--proxy-uid",
            SIDECAR,
            "--allow",
            "10.78.0.0/24",
            "--resolv-conf",
            resolv.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("IPv4 locked") && err.contains("IPv6 locked"),
        "{err}"
    );

    // The sidecar, as its own UID in the pod: the app's way out.
    let sc = p.sidecar(SIDECAR, CONFIG, PERMISSIVE_POLICY);
    let proxy = sc.proxy_url();
    let (code, body) = p.curl(APP, &["-x", &proxy, "http://10.77.0.2:8080/via-proxy"]);
    assert_eq!((code, body.as_str()), (0, "upstream-ok"));
    let line = &sc.log_lines(1)[0];
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["caller_uid"], 10001, "{line}");

    // Around it: refused at once (TCP reset), over IPv4 and IPv6, for the app and for root.
    assert_eq!(p.curl(APP, &[direct]).0, 7, "connection refused");
    assert_eq!(p.curl(APP, &["http://[fd00:77::2]:8080/"]).0, 7);
    assert_eq!(p.curl(ROOT, &[direct]).0, 7, "root is not exempt");
    // A datagram is refused at the send (EPERM) or by the ICMP error (ECONNREFUSED).
    let udp = p.udp(APP, "10.77.0.2", 5353);
    assert!(udp == "eperm" || udp == "refused", "{udp}");

    // What the lock admits: the sidecar's UID (IPv6 too: neighbour discovery gets out),
    // the allowed network, DNS to the pod's resolver, and replies to the app's clients.
    assert_eq!(p.curl(SIDECAR, &[direct]), (0, "upstream-ok".into()));
    assert_eq!(
        p.curl(SIDECAR, &["http://[fd00:77::2]:8080/"]),
        (0, "upstream-ok".into())
    );
    assert_eq!(
        p.curl(APP, &["http://10.78.0.2:8080/"]),
        (0, "upstream-ok".into())
    );
    assert_eq!(p.udp(APP, "10.77.0.2", 53), "ping");
    let inbound = p
        .cmd(&p.net, ROOT, "curl")
        .args(["-sS", "--max-time", "5", "http://10.77.0.1:9000/"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&inbound.stdout), "upstream-ok");
}

#[test]
fn rerunning_replaces_the_lock_keeps_other_rules_and_needs_net_admin() {
    let p = Pod::new("b");
    let _upstream = p.serve(&p.net, ROOT, &["tcp,10.78.0.2,8080"]);
    // Another tool's rule, which would let everything out if it came first.
    must(
        p.cmd(&p.pod, ROOT, "iptables")
            .args(["-A", "OUTPUT", "-j", "ACCEPT"]),
    );
    let args = ["--proxy-uid", SIDECAR, "--no-dns", "--allow", "10.78.0.2"];
    assert!(lock(&p, ROOT, &args).0);
    let first = rules(&p, "iptables");
    assert!(lock(&p, ROOT, &args).0);
    assert_eq!(rules(&p, "iptables"), first, "a rerun changes nothing");
    let output: Vec<&str> = first
        .lines()
        .filter(|l| l.starts_with("-A OUTPUT"))
        .collect();
    assert_eq!(
        output,
        ["-A OUTPUT -j CHAPERONE_EGRESS", "-A OUTPUT -j ACCEPT"],
        "one jump, first, and the other rule kept"
    );
    assert_eq!(
        p.curl(APP, &["http://10.78.0.2:8080/"]),
        (0, "upstream-ok".into())
    );

    // A new allow list replaces the old one.
    assert!(lock(&p, ROOT, &["--proxy-uid", SIDECAR, "--no-dns"]).0);
    let second = rules(&p, "iptables");
    assert!(!second.contains("10.78.0.2"), "{second}");
    assert_eq!(second.matches("-j CHAPERONE_EGRESS").count(), 1);
    assert_eq!(p.curl(APP, &["http://10.78.0.2:8080/"]).0, 7);

    // Without NET_ADMIN nothing changes, and it says why (exit 2: the pod does not start).
    let (ok, err) = lock(
        &p,
        APP,
        &["--proxy-uid", SIDECAR, "--no-dns", "--allow", "10.0.0.0/8"],
    );
    assert!(!ok);
    assert!(
        err.contains("chaperone egress-lock:") && err.contains("iptables"),
        "{err}"
    );
    assert_eq!(rules(&p, "iptables"), second);

    // A missing resolv.conf is an error that names the file, not an open DNS rule.
    let (ok, err) = lock(
        &p,
        ROOT,
        &[
            "--proxy-uid",
            SIDECAR,
            "--resolv-conf",
            "/nonexistent/resolv.conf",
        ],
    );
    assert!(!ok && err.contains("/nonexistent/resolv.conf"), "{err}");
}

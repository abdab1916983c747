//! `chaperone egress-lock` on a real kernel. Two network namespaces joined by a veth pair
//! stand for a pod and the network beyond it. The real binary writes the lock into the
//! pod's namespace with iptables-restore, the real sidecar runs there as its own UID, and
//! connections are made as the app's UID, the sidecar's and root's, over IPv4, IPv6 and UDP.
//!
//! Needs root, `ip` (iproute2), `iptables`, `setpriv` and /usr/bin/python3; `.ci/run`
//! installs them.

mod common;

use std::process::Command;

use common::*;

const APP: &str = "10001";
const SIDECAR: &str = "65532";
const ROOT: &str = "0";
/// Debian's Python: readable by every user (a pyenv one under /root is not).
const PYTHON: &str = "/usr/bin/python3";

/// A "pod" namespace (10.77.0.1, fd00:77::1) and a "net" namespace beyond it (10.77.0.2,
/// fd00:77::2, and 10.78.0.2 routed as a second network), deleted on drop.
struct Pod {
    pod: String,
    net: String,
}

impl Pod {
    fn new(tag: &str) -> Pod {
        let id = format!("{}-{tag}", std::process::id());
        let p = Pod {
            pod: format!("chp-pod-{id}"),
            net: format!("chp-net-{id}"),
        };
        let ip = |args: &str| {
            must(Command::new("ip").args(args.split_whitespace()));
        };
        ip(&format!("netns add {}", p.pod));
        ip(&format!("netns add {}", p.net));
        ip(&format!(
            "link add veth0 netns {} type veth peer name veth0 netns {}",
            p.pod, p.net
        ));
        for (ns, addrs) in [
            (&p.pod, vec!["10.77.0.1/24", "fd00:77::1/64"]),
            (
                &p.net,
                vec!["10.77.0.2/24", "10.78.0.2/32", "fd00:77::2/64"],
            ),
        ] {
            for a in addrs {
                // nodad: an IPv6 address is usable at once, not after duplicate detection.
                let nodad = if a.contains(':') { "nodad" } else { "" };
                ip(&format!("-n {ns} addr add {a} dev veth0 {nodad}"));
            }
            ip(&format!("-n {ns} link set veth0 up"));
            ip(&format!("-n {ns} link set lo up"));
        }
        ip(&format!("-n {} route add 10.78.0.0/24 dev veth0", p.pod));
        p
    }

    /// `ip netns exec NS setpriv --reuid UID ...`: a command in a namespace as a user.
    fn as_user(ns: &str, uid: &str) -> Vec<String> {
        let mut v: Vec<String> = ["ip", "netns", "exec", ns].map(String::from).to_vec();
        if uid != ROOT {
            v.extend(
                ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"].map(String::from),
            );
        }
        v
    }

    fn cmd(&self, ns: &str, uid: &str, program: &str) -> Command {
        let w = Self::as_user(ns, uid);
        let mut c = Command::new(&w[0]);
        c.args(&w[1..]).arg(program);
        c
    }

    /// curl from the pod as `uid`: (curl's exit code, HTTP status, body).
    fn curl(&self, uid: &str, args: &[&str]) -> (i32, String) {
        let out = self
            .cmd(&self.pod, uid, "curl")
            .args(["-sS", "--max-time", "5"])
            .args(args)
            .env_remove("http_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// One UDP datagram from the pod as `uid`: the echo, `refused` or `timeout`.
    fn udp(&self, uid: &str, host: &str, port: u16) -> String {
        let script = "import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b'ping')
    print(s.recv(64).decode())
except ConnectionRefusedError:
    print('refused')
except PermissionError:
    print('eperm')
except TimeoutError:
    print('timeout')";
        let out = self
            .cmd(&self.pod, uid, PYTHON)
            .args(["-c", script, host, &port.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `chaperone egress-lock` in the pod: as root with only the capability the manifests
    /// grant (NET_ADMIN), or as `uid`: (success, stderr).
    fn lock(&self, uid: &str, args: &[&str]) -> (bool, String) {
        let mut c = self.cmd(&self.pod, uid, "setpriv");
        c.args(["--bounding-set", "-all,+net_admin", "--inh-caps", "-all"]);
        let (ok, _, err) = run(c.arg(bin()).arg("egress-lock").args(args));
        (ok, err)
    }

    fn rules(&self, tool: &str) -> String {
        must(self.cmd(&self.pod, ROOT, tool).arg("-S"))
    }

    /// Servers in `ns`: `tcp,ADDR,PORT` answers HTTP 200 `upstream-ok`, `udp,ADDR,PORT` echoes.
    fn serve(&self, ns: &str, uid: &str, specs: &[&str]) -> ServerProcess {
        let script = "import http.server, socket, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'upstream-ok'
        self.send_response(200)
        self.send_header('content-length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
def udp(s):
    while True:
        d, a = s.recvfrom(512)
        s.sendto(d, a)
for spec in sys.argv[1:]:
    kind, addr, port = spec.split(',')
    fam = socket.AF_INET6 if ':' in addr else socket.AF_INET
    if kind == 'tcp':
        cls = type('S', (http.server.ThreadingHTTPServer,), {'address_family': fam})
        srv = cls((addr, int(port)), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((addr, int(port)))
        threading.Thread(target=udp, args=(s,), daemon=True).start()
print('ready', flush=True)
threading.Event().wait()";
        let mut c = self.cmd(ns, uid, PYTHON);
        c.args(["-c", script]).args(specs);
        ServerProcess::start(c, "test servers")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.net] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
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
policy:
  file: "{dir}/policy.cedar"
log:
  format: json
  output: stdout
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
    let (ok, err) = p.lock(
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
    let wrapper = Pod::as_user(&p.pod, SIDECAR);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let sc = Sidecar::start_wrapped(&wrapper, CONFIG, PERMISSIVE_POLICY);
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
    assert!(p.lock(ROOT, &args).0);
    let first = p.rules("iptables");
    assert!(p.lock(ROOT, &args).0);
    assert_eq!(p.rules("iptables"), first, "a rerun changes nothing");
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
    assert!(p.lock(ROOT, &["--proxy-uid", SIDECAR, "--no-dns"]).0);
    let second = p.rules("iptables");
    assert!(!second.contains("10.78.0.2"), "{second}");
    assert_eq!(second.matches("-j CHAPERONE_EGRESS").count(), 1);
    assert_eq!(p.curl(APP, &["http://10.78.0.2:8080/"]).0, 7);

    // Without NET_ADMIN nothing changes, and it says why (exit 2: the pod does not start).
    let (ok, err) = p.lock(
        APP,
        &["--proxy-uid", SIDECAR, "--no-dns", "--allow", "10.0.0.0/8"],
    );
    assert!(!ok);
    assert!(
        err.contains("chaperone egress-lock:") && err.contains("iptables"),
        "{err}"
    );
    assert_eq!(p.rules("iptables"), second);

    // A missing resolv.conf is an error that names the file, not an open DNS rule.
    let (ok, err) = p.lock(
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

//! Network namespaces for tests that need a real kernel network: a "pod" and the network
//! beyond it, joined by a veth pair, with commands run in either as any user. Needs root,
//! `ip` (iproute2), `setpriv` and /usr/bin/python3 (`.ci/run` installs them).

use std::process::Command;

use super::*;

pub const APP: &str = "10001";
pub const SIDECAR: &str = "65532";
pub const ROOT: &str = "0";
/// Debian's Python: readable by every user (a pyenv one under /root is not).
pub const PYTHON: &str = "/usr/bin/python3";

/// A "pod" namespace (10.77.0.1, fd00:77::1) and a "net" namespace beyond it (10.77.0.2,
/// fd00:77::2; 10.78.0.2 routed as a second network; and the cloud metadata address
/// 169.254.169.254), deleted on drop.
pub struct Pod {
    pub pod: String,
    pub net: String,
}

impl Pod {
    pub fn new(tag: &str) -> Pod {
        Self::with_hosts(tag, "")
    }

    /// Like [`Pod::new`], with `hosts` as the pod's /etc/hosts (`ip netns exec` mounts
    /// /etc/netns/NAME/hosts over it), so names resolve to the test's addresses.
    pub fn with_hosts(tag: &str, hosts: &str) -> Pod {
        let id = format!("{}-{tag}", std::process::id());
        let p = Pod {
            pod: format!("chp-pod-{id}"),
            net: format!("chp-net-{id}"),
        };
        if !hosts.is_empty() {
            let dir = Path::new("/etc/netns").join(&p.pod);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("hosts"), hosts).unwrap();
        }
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
                vec![
                    "10.77.0.2/24",
                    "10.78.0.2/32",
                    "169.254.169.254/32",
                    "fd00:77::2/64",
                ],
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
        ip(&format!(
            "-n {} route add 169.254.169.254/32 dev veth0",
            p.pod
        ));
        p
    }

    /// `ip netns exec NS setpriv --reuid UID ...`: a command in a namespace as a user.
    pub fn as_user(ns: &str, uid: &str) -> Vec<String> {
        let mut v: Vec<String> = ["ip", "netns", "exec", ns].map(String::from).to_vec();
        if uid != ROOT {
            v.extend(
                ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"].map(String::from),
            );
        }
        v
    }

    pub fn cmd(&self, ns: &str, uid: &str, program: &str) -> Command {
        let w = Self::as_user(ns, uid);
        let mut c = Command::new(&w[0]);
        c.args(&w[1..]).arg(program);
        c
    }

    /// curl from the pod as `uid`: (curl's exit code, HTTP status, body).
    pub fn curl(&self, uid: &str, args: &[&str]) -> (i32, String) {
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
    pub fn udp(&self, uid: &str, host: &str, port: u16) -> String {
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

    /// The real sidecar in the pod as `uid`, on `config` (listeners, identity, routes) with
    /// `policy`, logging JSON to stdout.
    pub fn sidecar(&self, uid: &str, config: &str, policy: &str) -> Sidecar {
        let wrapper = Self::as_user(&self.pod, uid);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let yaml = format!(
            "{config}policy:\n  file: \"{{dir}}/policy.cedar\"\nlog:\n  format: json\n  output: stdout\n"
        );
        Sidecar::start_wrapped(&wrapper, &yaml, policy)
    }

    /// Servers in `ns`: `tcp,ADDR,PORT` answers HTTP 200 `upstream-ok`, `udp,ADDR,PORT` echoes.
    pub fn serve(&self, ns: &str, uid: &str, specs: &[&str]) -> ServerProcess {
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
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.pod));
    }
}

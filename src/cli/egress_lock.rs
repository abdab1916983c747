//! `chaperone egress-lock`: make the sidecar the app's only way out of the pod.
//!
//! A NetworkPolicy selects pods, and the app and Chaperone share the pod's network
//! namespace, so it cannot tell their connections apart: an app that ignores `HTTP_PROXY`
//! reaches whatever the sidecar may reach. The kernel can tell them apart: netfilter's
//! `owner` match sees the UID of the socket behind each outgoing packet. This command, run
//! once per pod by an init container with `NET_ADMIN` before the sidecar starts, writes one
//! chain, `CHAPERONE_EGRESS`, and makes it the first rule of the `filter` table's `OUTPUT`
//! chain, for IPv4 and IPv6:
//!
//! - each family is written by one `iptables-restore --noflush` transaction, so the pod is
//!   never left half-locked, and other tools' rules and chains are kept;
//! - a rerun (the init container restarted) replaces the chain and leaves exactly one jump;
//! - the result is read back and checked, so a lock that did not take fails the pod's start
//!   (fail closed) instead of leaving it open.
//!
//! The chain only `RETURN`s what it admits (other rules still apply) and rejects the rest.

use super::Exit;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// The chain this command owns.
pub(crate) const CHAIN: &str = "CHAPERONE_EGRESS";

/// An address family: each has its own tables and tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// IPv4: `iptables-restore`.
    V4,
    /// IPv6: `ip6tables-restore`.
    V6,
}

impl Family {
    /// `IPv4` or `IPv6`, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
    fn holds(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// What may leave the pod without going through the sidecar.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lock {
    /// UIDs whose sockets may connect anywhere: the sidecar's first, then any other exempt
    /// user (a node agent's container, say).
    pub(crate) exempt_uids: Vec<u32>,
    /// Destinations every container may reach directly (services listed in `NO_PROXY`).
    pub(crate) allow: Vec<IpNet>,
    /// Resolvers every container may query on port 53, UDP and TCP.
    pub(crate) resolvers: Vec<IpAddr>,
}

impl Lock {
    /// The chain's rules for one family, in `iptables-restore` syntax. The first match
    /// decides, so the order is the policy:
    /// 1. loopback: the app reaches the proxy on 127.0.0.1 and `::1` (and anything else
    ///    inside the pod, whose own addresses are routed over `lo` too);
    /// 2. packets of connections already established or related to one: replies to
    ///    connections others opened (the app's own clients, kubelet probes) and ICMP errors.
    ///    A connection the app opens is NEW, so this admits nothing the later rules refuse;
    /// 3. (IPv6) neighbour discovery: the kernel sends it from its own socket, which has no
    ///    UID, and without it no IPv6 packet leaves, the sidecar's included;
    /// 4. the sidecar's UID and the other exempt UIDs: Chaperone's upstream connections;
    /// 5. DNS to the pod's resolvers, for `NO_PROXY` names and clients that resolve a name
    ///    before asking the proxy;
    /// 6. the allowed destinations;
    /// 7. everything else is refused: TCP with a reset, so the client fails at once with
    ///    "connection refused" instead of hanging, and the rest with port-unreachable.
    pub(crate) fn rules(&self, family: Family) -> Vec<String> {
        let mut r = vec![
            format!("-A {CHAIN} -o lo -j RETURN"),
            format!("-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"),
        ];
        if family == Family::V6 {
            for t in [
                "router-solicitation",
                "neighbour-solicitation",
                "neighbour-advertisement",
            ] {
                r.push(format!(
                    "-A {CHAIN} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
                ));
            }
        }
        for uid in &self.exempt_uids {
            r.push(format!("-A {CHAIN} -m owner --uid-owner {uid} -j RETURN"));
        }
        for ns in self.resolvers.iter().filter(|ip| family.holds(ip)) {
            let net = IpNet::from(*ns);
            for proto in ["udp", "tcp"] {
                r.push(format!(
                    "-A {CHAIN} -d {net} -p {proto} -m {proto} --dport 53 -j RETURN"
                ));
            }
        }
        for net in self.allow.iter().filter(|n| family.holds(&n.addr())) {
            r.push(format!("-A {CHAIN} -d {} -j RETURN", net.trunc()));
        }
        let unreachable = match family {
            Family::V4 => "icmp-port-unreachable",
            Family::V6 => "icmp6-port-unreachable",
        };
        r.push(format!(
            "-A {CHAIN} -p tcp -j REJECT --reject-with tcp-reset"
        ));
        r.push(format!("-A {CHAIN} -j REJECT --reject-with {unreachable}"));
        r
    }

    /// The `iptables-restore --noflush` input: the chain (declaring it empties it), its
    /// rules, every existing jump to it removed and one inserted first in `OUTPUT`, in one
    /// transaction. `existing_jumps` is how many `-j CHAPERONE_EGRESS` rules `OUTPUT` holds.
    pub(crate) fn restore_input(&self, family: Family, existing_jumps: usize) -> String {
        let mut s = format!("*filter\n:{CHAIN} - [0:0]\n");
        for rule in self.rules(family) {
            s.push_str(&rule);
            s.push('\n');
        }
        for _ in 0..existing_jumps {
            s.push_str(&format!("-D OUTPUT -j {CHAIN}\n"));
        }
        // First in OUTPUT: a rule before it that accepts would let the app around the lock.
        s.push_str(&format!("-I OUTPUT 1 -j {CHAIN}\nCOMMIT\n"));
        s
    }
}

/// A destination on the command line: a CIDR (`10.96.0.0/12`) or one address.
pub(crate) fn parse_destination(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is neither an address nor a CIDR"))
}

/// A list for messages: `a, b` or `none`.
pub(crate) fn listing<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `nameserver` addresses of a resolv.conf (zone indexes such as `%eth0` dropped).
pub(crate) fn resolvers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// What `iptables-save -t filter` shows of the lock: the jumps in `OUTPUT` (and whether
/// the first rule of `OUTPUT` is one) and the chain's rules.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Installed {
    /// How many `-A OUTPUT -j CHAPERONE_EGRESS` rules there are.
    pub(crate) jumps: usize,
    /// Whether the first rule of `OUTPUT` is the jump.
    pub(crate) first: bool,
    /// The chain's rules as saved.
    pub(crate) rules: Vec<String>,
}

/// Read [`Installed`] from `iptables-save -t filter` output.
pub(crate) fn installed(save: &str) -> Installed {
    let jump = format!("-A OUTPUT -j {CHAIN}");
    let chain = format!("-A {CHAIN} ");
    let mut out = Installed::default();
    let mut seen_output_rule = false;
    for line in save.lines().map(str::trim) {
        if line.starts_with("-A OUTPUT ") {
            if line == jump {
                out.jumps += 1;
                out.first |= !seen_output_rule;
            }
            seen_output_rule = true;
        } else if line.starts_with(&chain) {
            out.rules.push(line.to_string());
        }
    }
    out
}

/// Apply the lock for `family` and check it took; returns the installed state.
pub(crate) fn apply(lock: &Lock, family: Family) -> Result<Installed, String> {
    let before = installed(&save(family)?);
    let input = lock.restore_input(family, before.jumps);
    let mut child = Command::new(family.restore())
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error(family.restore(), &e))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .map_err(|e| format!("{}: {e}", family.restore()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", family.restore()))?;
    if !out.status.success() {
        return Err(format!(
            "{} refused the {} rules ({}): {}",
            family.restore(),
            family.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let after = installed(&save(family)?);
    let want = lock.rules(family).len();
    if after.jumps != 1 || !after.first || after.rules.len() != want {
        return Err(format!(
            "the {} lock did not take: OUTPUT has {} jump(s) to {CHAIN} (first: {}), and the \
             chain {} rule(s) where {want} were written",
            family.name(),
            after.jumps,
            after.first,
            after.rules.len()
        ));
    }
    Ok(after)
}

fn save(family: Family) -> Result<String, String> {
    let out = Command::new(family.save())
        .args(["-t", "filter"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| tool_error(family.save(), &e))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            family.save(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool_error(tool: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!(
            "{tool} not found: run egress-lock from the image that carries iptables \
             (deploy/Dockerfile, target egress-lock)"
        )
    } else {
        format!("{tool}: {e}")
    }
}

/// Whether the kernel has IPv6 (no IPv6 packet can leave a pod whose kernel has none).
pub(crate) fn ipv6_enabled() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// `chaperone egress-lock`: 0 locked (or printed), 2 error (the pod does not start).
pub(crate) fn command(
    exempt_uids: Vec<u32>,
    allow: Vec<ipnet::IpNet>,
    no_dns: bool,
    resolv_conf: &std::path::Path,
    print: bool,
) -> Exit {
    let resolvers = if no_dns {
        Vec::new()
    } else {
        match std::fs::read_to_string(resolv_conf) {
            Ok(text) => resolvers(&text),
            Err(e) => {
                eprintln!(
                    "chaperone egress-lock: {}: {e} (or pass --no-dns)",
                    resolv_conf.display()
                );
                return Exit::Error;
            }
        }
    };
    let lock = Lock {
        exempt_uids,
        allow,
        resolvers,
    };
    if print {
        for family in [Family::V4, Family::V6] {
            println!("# {}", family.name());
            print!("{}", lock.restore_input(family, 0));
        }
        return Exit::Ok;
    }
    let mut families = vec![Family::V4];
    if ipv6_enabled() {
        families.push(Family::V6);
    } else {
        eprintln!("chaperone egress-lock: the kernel has no IPv6; IPv4 only");
    }
    for family in families {
        match apply(&lock, family) {
            Ok(done) => eprintln!(
                "chaperone egress-lock: {} locked: {} rule(s) in {}, jumped to first from OUTPUT",
                family.name(),
                done.rules.len(),
                CHAIN
            ),
            Err(e) => {
                eprintln!("chaperone egress-lock: {e}");
                return Exit::Error;
            }
        }
    }
    eprintln!(
        "chaperone egress-lock: leaving the pod directly: loopback, replies, UID(s) {}, DNS to {}, destinations {}; everything else is refused",
        listing(&lock.exempt_uids),
        listing(&lock.resolvers),
        listing(&lock.allow)
    );
    Exit::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock() -> Lock {
        Lock {
            exempt_uids: vec![65532],
            allow: vec![
                "10.96.0.1/32".parse().unwrap(),
                "fd00:10::5/64".parse().unwrap(),
            ],
            resolvers: resolvers("search ml.svc\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n"),
        }
    }

    #[test]
    fn rules_admit_loopback_replies_the_sidecar_dns_and_allowed_then_refuse() {
        let v4 = lock().rules(Family::V4);
        assert_eq!(
            v4,
            [
                "-A CHAPERONE_EGRESS -o lo -j RETURN",
                "-A CHAPERONE_EGRESS -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
                "-A CHAPERONE_EGRESS -m owner --uid-owner 65532 -j RETURN",
                "-A CHAPERONE_EGRESS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j RETURN",
                "-A CHAPERONE_EGRESS -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j RETURN",
                "-A CHAPERONE_EGRESS -d 10.96.0.1/32 -j RETURN",
                "-A CHAPERONE_EGRESS -p tcp -j REJECT --reject-with tcp-reset",
                "-A CHAPERONE_EGRESS -j REJECT --reject-with icmp-port-unreachable",
            ]
        );
        let v6 = lock().rules(Family::V6);
        assert!(v6.iter().any(|r| r.contains("neighbour-solicitation")));
        assert!(v6.contains(
            &"-A CHAPERONE_EGRESS -d fe80::1/128 -p udp -m udp --dport 53 -j RETURN".to_string()
        ));
        // The allowed network is written as a network, host bits cleared.
        assert!(v6.contains(&"-A CHAPERONE_EGRESS -d fd00:10::/64 -j RETURN".to_string()));
        assert!(
            !v6.iter().any(|r| r.contains("10.96.")),
            "no IPv4 in IPv6 rules"
        );
        assert_eq!(
            v6.last().unwrap(),
            "-A CHAPERONE_EGRESS -j REJECT --reject-with icmp6-port-unreachable"
        );
    }

    #[test]
    fn restore_input_replaces_every_jump_with_one_first() {
        let s = lock().restore_input(Family::V4, 2);
        assert!(s.starts_with("*filter\n:CHAPERONE_EGRESS - [0:0]\n"));
        assert_eq!(s.matches("-D OUTPUT -j CHAPERONE_EGRESS\n").count(), 2);
        assert!(s.ends_with("-I OUTPUT 1 -j CHAPERONE_EGRESS\nCOMMIT\n"));
    }

    #[test]
    fn installed_reads_jumps_their_position_and_the_chain() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CHAPERONE_EGRESS - [0:0]\n\
                    -A OUTPUT -j CHAPERONE_EGRESS\n-A OUTPUT -d 1.2.3.4/32 -j ACCEPT\n\
                    -A CHAPERONE_EGRESS -o lo -j RETURN\nCOMMIT\n";
        assert_eq!(
            installed(save),
            Installed {
                jumps: 1,
                first: true,
                rules: vec!["-A CHAPERONE_EGRESS -o lo -j RETURN".into()]
            }
        );
        let late = "-A OUTPUT -j ACCEPT\n-A OUTPUT -j CHAPERONE_EGRESS\n";
        assert!(!installed(late).first);
        assert_eq!(installed(late).jumps, 1);
    }

    #[test]
    fn resolvers_skip_comments_options_and_bad_addresses() {
        assert_eq!(
            parse_destination("10.96.0.1").unwrap(),
            "10.96.0.1/32".parse::<IpNet>().unwrap()
        );
        assert!(parse_destination("10.96.0.0/33").is_err());
        let r = resolvers(
            "# nameserver 1.1.1.1\noptions ndots:5\nnameserver  10.0.0.10 \nnameserver bogus\n",
        );
        assert_eq!(r, vec!["10.0.0.10".parse::<IpAddr>().unwrap()]);
    }
}

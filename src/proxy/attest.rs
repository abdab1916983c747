//! Kernel attestation of who is on the other end of a client connection.
//!
//! A pod's containers share one network namespace, so any of them can connect to any
//! stage's listener on 127.0.0.1. What tells them apart is the user they run as: the kernel
//! records the owning UID of every socket. For a TCP connection from inside the pod, the
//! client's socket is in this namespace's socket table (`/proc/net/tcp`, `/proc/net/tcp6`),
//! keyed by its address and port, with its UID; a listener that lists `callers.uids` admits a
//! connection only when that UID is one of them. A process cannot choose the UID its socket
//! is recorded under (short of being root in the pod, which the deployment forbids).

use std::net::{IpAddr, SocketAddr};

use crate::identify::Attestation;

/// Attest the client at `peer` of the listener at `local`, which admits `admitted`
/// (`None`: anyone).
pub(crate) fn attest(peer: SocketAddr, local: SocketAddr, admitted: Option<&[u32]>) -> Attestation {
    let Some(admitted) = admitted else {
        return Attestation::Unchecked;
    };
    match tcp_owner(peer, local) {
        Ok(Some(uid)) => attest_uid(uid, &format!("the connection from {peer}"), Some(admitted)),
        Ok(None) => Attestation::Refused(format!(
            "caller not attested: no socket in this network namespace connects from {peer} (a caller outside the pod cannot be attested)"
        )),
        Err(e) => Attestation::Refused(format!(
            "caller not attested: cannot read the kernel's socket table: {e}"
        )),
    }
}

/// Admit or refuse a caller whose UID the kernel reported (`SO_PEERCRED` on a Unix socket,
/// or the socket table for TCP); `what` names the connection in the reason. With no
/// `admitted` list the UID is only recorded.
pub(crate) fn attest_uid(uid: u32, what: &str, admitted: Option<&[u32]>) -> Attestation {
    match admitted {
        Some(list_) if !list_.contains(&uid) => Attestation::Refused(format!(
            "caller not admitted: {what} belongs to uid {uid}; this listener admits uid {}",
            list(list_)
        )),
        _ => Attestation::Admitted(uid),
    }
}

fn list(uids: &[u32]) -> String {
    uids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// The UID owning the TCP socket that is connected from `peer` to `local`, from the kernel's
/// socket tables (IPv4 and IPv6; v4-mapped addresses compared as v4). The table the client
/// is likelier in is read first (an IPv4 client in `tcp`, a v4-mapped or IPv6 one in
/// `tcp6`), and the other only when it is not there.
pub(crate) fn tcp_owner(peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<u32>> {
    use procfs::net::{tcp, tcp6};
    type Table = fn() -> procfs::ProcResult<Vec<procfs::net::TcpNetEntry>>;
    let (peer, local) = (unmapped(peer), unmapped(local));
    let tables: [Table; 2] = if peer.is_ipv4() {
        [tcp, tcp6]
    } else {
        [tcp6, tcp]
    };
    let mut failed = Vec::new();
    for table in tables {
        match table() {
            Ok(entries) => {
                if let Some(e) = entries.iter().find(|e| {
                    unmapped(e.local_address) == peer && unmapped(e.remote_address) == local
                }) {
                    return Ok(Some(e.uid));
                }
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    // Both tables unreadable: say so; one missing (no IPv6) is normal.
    if failed.len() == tables.len() {
        return Err(std::io::Error::other(failed.join("; ")));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner of our own client socket is our own UID; other UIDs are refused.
    #[test]
    fn a_loopback_connection_is_attested_to_its_owner() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
        assert_eq!(tcp_owner(peer, local).unwrap(), Some(me));
        assert_eq!(attest(peer, local, None), Attestation::Unchecked);
        assert_eq!(attest(peer, local, Some(&[me])), Attestation::Admitted(me));
        let other = me.wrapping_add(4242);
        match attest(peer, local, Some(&[other])) {
            Attestation::Refused(why) => {
                assert!(why.contains(&format!("belongs to uid {me}")), "{why}");
                assert!(why.contains(&format!("admits uid {other}")), "{why}");
            }
            a => panic!("{a:?}"),
        }
        // No such connection: refused, not guessed.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(
            attest(nobody, local, Some(&[me])),
            Attestation::Refused(_)
        ));
    }
}

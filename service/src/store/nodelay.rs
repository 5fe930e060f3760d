//! TCP_NODELAY on the store's PostgreSQL connections.
//!
//! sqlx 0.9.0 opens its TCP sockets with Nagle's algorithm on (it set
//! TCP_NODELAY before, and sets it again after 0.9.0: sqlx issue 4335).
//! A statement whose messages span more than one TCP segment (a dispatch
//! start naming 2,048 ids, a record's bulk UPDATE) then sends its last
//! part only once the server has acknowledged the first, and the server
//! delays that acknowledgement: about 40 ms, sometimes twice, per
//! statement, on loopback as on a network (measured: a 2,048-row claim
//! spent 0.4 s of its 0.6 s waiting so, with every statement under 50 ms
//! on the server).
//!
//! sqlx gives no access to its socket, so each new connection's socket is
//! found among the process's file descriptors by its peer (the database's
//! address, as resolved when the connection is made) and given
//! TCP_NODELAY ([`after_connect`]). Nothing else is changed: a socket with
//! another peer, or that has it already, is left as it is.

/// The pool's `after_connect` hook: [`after_connect`] towards the
/// database at `host:port`.
pub(super) fn hook(
    host: &str,
    port: u16,
    unix_socket: bool,
) -> impl for<'c> Fn(
    &'c mut sqlx::PgConnection,
    sqlx::pool::PoolConnectionMetadata,
) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>>
+ Clone
+ Send
+ Sync
+ 'static {
    let host: std::sync::Arc<str> = host.into();
    move |_, _| {
        let host = host.clone();
        Box::pin(async move {
            if !unix_socket {
                let changed = after_connect(&host, port).await;
                tracing::debug!(changed, "TCP_NODELAY set on the new connection's socket");
            }
            Ok(())
        })
    }
}

/// Sets TCP_NODELAY on every TCP socket of this process connected to
/// `host:port` that does not have it yet. Best effort: a socket that
/// cannot be read or changed is passed by (the connection works either
/// way, only slower). Returns how many were changed. Linux only
/// (`/proc/self/fd`); elsewhere nothing is done.
pub(super) async fn after_connect(host: &str, port: u16) -> usize {
    if host.starts_with('/') {
        // A Unix socket: no Nagle.
        return 0;
    }
    set_nodelay_towards(&peers(host, port).await)
}

/// The addresses `host:port` resolves to, by address and port (an IPv6
/// peer's flow and scope are not compared); none if it does not resolve
/// within 500 ms (the hook runs within the pool's acquire timeout, and a
/// connection is made either way).
async fn peers(host: &str, port: u16) -> Vec<(std::net::IpAddr, u16)> {
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(std::time::Duration::from_millis(500), lookup).await {
        Ok(Ok(found)) => found.map(|a| (a.ip(), a.port())).collect(),
        _ => Vec::new(),
    }
}

#[cfg(target_os = "linux")]
fn set_nodelay_towards(peers: &[(std::net::IpAddr, u16)]) -> usize {
    let mut changed = 0;
    each_socket_towards(peers, |sock| {
        if sock.tcp_nodelay().ok() == Some(false) && sock.set_tcp_nodelay(true).is_ok() {
            changed += 1;
        }
    });
    changed
}

/// The TCP sockets of this process connected to `host:port`, each as its
/// local port and whether it has TCP_NODELAY: for the tests that the
/// store's pools set it (the server sees a connection's local port as its
/// `client_port`). Linux only (elsewhere none are found).
#[cfg(feature = "contract")]
pub async fn sockets_towards(host: &str, port: u16) -> Vec<(u16, bool)> {
    let peers = peers(host, port).await;
    #[cfg(target_os = "linux")]
    {
        let mut found = Vec::new();
        each_socket_towards(&peers, |sock| {
            if let Some(local) = sock.local_addr().ok().and_then(|a| a.as_socket()) {
                found.push((local.port(), sock.tcp_nodelay().ok() == Some(true)));
            }
        });
        found
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = peers;
        Vec::new()
    }
}

/// Calls `f` with each TCP socket of this process connected to one of
/// `peers` (address and port).
#[cfg(target_os = "linux")]
fn each_socket_towards(peers: &[(std::net::IpAddr, u16)], mut f: impl FnMut(socket2::SockRef<'_>)) {
    use std::os::fd::{BorrowedFd, RawFd};
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for fd in fds.flatten() {
        let Some(fd) = fd
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: `fd` was open when listed, but nothing keeps it open:
        // should another thread close it meanwhile (and the number be
        // reused), this borrow breaks I/O safety, though not memory
        // safety. The calls here and in `f` are getpeername, getsockname
        // and get/setsockopt only: on anything that is not a connected
        // socket they fail (EBADF, ENOTSOCK, ENOTCONN), and a socket is
        // changed only if it is connected to the database's address
        // (another pool's connection to it included, which is as
        // harmless). Nothing is
        // read or written through it, and it is never closed here.
        #[allow(unsafe_code)]
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let Some(peer) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        if !peers.contains(&(peer.ip(), peer.port()))
            || sock.r#type().ok() != Some(socket2::Type::STREAM)
        {
            continue;
        }
        f(sock);
    }
}

#[cfg(not(target_os = "linux"))]
fn set_nodelay_towards(_peers: &[(std::net::IpAddr, u16)]) -> usize {
    0
}

#[cfg(test)]
mod tests {
    /// A socket connected to the address given gets TCP_NODELAY; one
    /// connected elsewhere is left as it is.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn only_sockets_to_the_database_get_nodelay() {
        let db = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (db_addr, other_addr) = (db.local_addr().unwrap(), other.local_addr().unwrap());
        let to_db = tokio::net::TcpStream::connect(db_addr).await.unwrap();
        let elsewhere = tokio::net::TcpStream::connect(other_addr).await.unwrap();
        assert!(!to_db.nodelay().unwrap(), "Nagle is on by default");
        assert!(!elsewhere.nodelay().unwrap());
        let changed = super::after_connect("127.0.0.1", db_addr.port()).await;
        assert_eq!(changed, 1);
        assert!(to_db.nodelay().unwrap());
        assert!(!elsewhere.nodelay().unwrap(), "another peer is left alone");
        // Once set, not counted again.
        assert_eq!(super::after_connect("127.0.0.1", db_addr.port()).await, 0);
    }
}

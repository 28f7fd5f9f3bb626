//! Readiness for a service manager: systemd's notification protocol
//! (`sd_notify(3)`), which is one datagram on the unix socket named by
//! `$NOTIFY_SOCKET`. Without that variable (not started by systemd with
//! `Type=notify`) every call does nothing.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tell the service manager (if any) `state`, e.g. `READY=1`. Failures are
/// logged, never fatal: the hub serves either way.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    if let Err(e) = notify_to(&socket, state) {
        tracing::warn!(socket = %socket.to_string_lossy(), error = %e, state, "cannot notify the service manager");
    }
}

/// Send `state` to the notification socket `socket`: a path, or `@name`
/// for a socket in Linux's abstract namespace.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        _ if bytes.first() == Some(&b'/') || bytes.starts_with(b"@") => {
            sock.send_to(state.as_bytes(), socket)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only unix socket paths and @abstract names are supported",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_one_datagram_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_relative_or_vsock_address_is_refused() {
        let e = notify_to(OsStr::new("vsock:2:1234"), "READY=1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }
}

//! Small helpers: hex, JSON string escaping, address bytes.

use std::net::SocketAddr;

/// A socket address as the shims' `set_peer` functions take it (see csrc/dgram.h).
pub struct PeerAddr {
    /// 4 or 6.
    pub family: std::ffi::c_int,
    /// The first 4 (IPv4) or all 16 (IPv6) bytes are the address.
    pub ip: [u8; 16],
    pub port: u16,
    pub flowinfo: u32,
    pub scope_id: u32,
}

pub fn peer_addr(addr: SocketAddr) -> PeerAddr {
    match addr {
        SocketAddr::V4(a) => {
            let mut ip = [0u8; 16];
            ip[..4].copy_from_slice(&a.ip().octets());
            PeerAddr {
                family: 4,
                ip,
                port: a.port(),
                flowinfo: 0,
                scope_id: 0,
            }
        }
        SocketAddr::V6(a) => PeerAddr {
            family: 6,
            ip: a.ip().octets(),
            port: a.port(),
            flowinfo: a.flowinfo(),
            scope_id: a.scope_id(),
        },
    }
}

pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A JSON string literal (with quotes).
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// Client transport id for DTLS cookies: IP bytes followed by the port (big-endian).
pub fn addr_bytes(a: &SocketAddr) -> Vec<u8> {
    let mut v = match a {
        SocketAddr::V4(a) => a.ip().octets().to_vec(),
        SocketAddr::V6(a) => a.ip().octets().to_vec(),
    };
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

/// Set by SIGINT/SIGTERM once [`install_stop_handlers`] ran: the server finishes its loop and
/// writes its report, whichever DTLS library it runs on.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: std::ffi::c_int) {
    // Async-signal-safe: one atomic store.
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT and SIGTERM set the stop flag. Without SA_RESTART, so a blocking receive returns
/// EINTR and the loop sees the flag at once.
pub fn install_stop_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(std::ffi::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            anyhow::bail!("sigaction({sig}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Has SIGINT or SIGTERM arrived since [`install_stop_handlers`]?
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn hex_roundtrip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), b);
        assert_eq!(from_hex("0x0A").unwrap(), vec![10]);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
        assert!(from_hex("é1").is_none());
    }
    #[test]
    fn json_escape() {
        assert_eq!(json_str("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }
}

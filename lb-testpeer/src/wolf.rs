//! Declarations of the wolfSSL shim (csrc/wolf_shim.c, the DTLS 1.3 backend) and thin safe
//! wrappers; the counterpart of ffi.rs.
//!
//! No global lock: wolfSSL is built with pthreads, a [`Conf`] (WOLFSSL_CTX) may be shared by
//! threads, and each [`Sess`] (WOLFSSL) is owned and used by one thread at a time (`Send`,
//! not `Sync`).

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::net::SocketAddr;
use std::os::fd::RawFd;

#[repr(C)]
pub struct RawConf {
    _p: [u8; 0],
}
#[repr(C)]
pub struct RawSess {
    _p: [u8; 0],
}

extern "C" {
    fn cidlb13_code(which: c_int) -> c_int;
    fn cidlb13_global_init() -> c_int;
    fn cidlb13_random(buf: *mut u8, len: usize) -> c_int;
    fn cidlb13_strerror(err: c_int, buf: *mut c_char, len: usize);
    fn cidlb13_version() -> *const c_char;

    fn cidlb13_conf_new(
        is_server: c_int,
        psk: *const u8,
        psk_len: usize,
        identity: *const u8,
        identity_len: usize,
        err: *mut c_int,
    ) -> *mut RawConf;
    fn cidlb13_conf_free(c: *mut RawConf);

    fn cidlb13_sess_new(
        c: *mut RawConf,
        fd: c_int,
        recv_from_fd: c_int,
        err: *mut c_int,
    ) -> *mut RawSess;
    fn cidlb13_sess_free(s: *mut RawSess);
    fn cidlb13_sess_set_fd(s: *mut RawSess, fd: c_int);
    fn cidlb13_sess_set_drop_permille(s: *mut RawSess, p: c_uint);
    fn cidlb13_sess_set_peer(
        s: *mut RawSess,
        family: c_int,
        ip: *const u8,
        port: u16,
        flowinfo: u32,
        scope_id: u32,
    ) -> c_int;
    fn cidlb13_sess_feed(s: *mut RawSess, data: *const u8, len: usize) -> c_int;
    fn cidlb13_sess_use_cid(s: *mut RawSess, cid: *const u8, len: usize) -> c_int;
    fn cidlb13_sess_get_tx_cid(s: *mut RawSess, out: *mut u8, cap: usize, len: *mut usize)
        -> c_int;
    fn cidlb13_sess_handshake(s: *mut RawSess) -> c_int;
    fn cidlb13_sess_read(s: *mut RawSess, buf: *mut u8, len: usize) -> c_int;
    fn cidlb13_sess_write(s: *mut RawSess, buf: *const u8, len: usize) -> c_int;
    fn cidlb13_sess_close_notify(s: *mut RawSess);
    fn cidlb13_sess_timeout_ms(s: *mut RawSess) -> c_int;
    fn cidlb13_sess_got_timeout(s: *mut RawSess) -> c_int;
    fn cidlb13_sess_is_stateful(s: *mut RawSess) -> c_int;
    fn cidlb13_sess_ciphersuite(s: *mut RawSess) -> *const c_char;
    fn cidlb13_sess_stats(s: *mut RawSess, out: *mut u64);
}

/// The shim's non-error results besides `>= 0`; everything else negative is a wolfSSL error.
#[derive(Clone, Copy, Debug)]
pub struct Codes {
    pub want_read: i32,
    pub want_write: i32,
    /// The peer sent close_notify.
    pub closed: i32,
}

pub fn codes() -> Codes {
    // SAFETY: a pure function of constants.
    unsafe {
        Codes {
            want_read: cidlb13_code(0),
            want_write: cidlb13_code(1),
            closed: cidlb13_code(2),
        }
    }
}

/// wolfSSL_Init + the shim's RNG. Idempotent, thread-safe.
pub fn global_init() -> anyhow::Result<()> {
    // SAFETY: the shim serialises initialisation with its own mutex.
    let r = unsafe { cidlb13_global_init() };
    if r != 0 {
        anyhow::bail!("wolfSSL init failed: {}", strerror(r));
    }
    Ok(())
}

pub fn version() -> String {
    // SAFETY: wolfSSL_lib_version returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(cidlb13_version()) }
        .to_string_lossy()
        .into_owned()
}

pub fn strerror(err: i32) -> String {
    let mut buf = [0 as c_char; 160];
    // SAFETY: the buffer and its length are valid; wolfSSL NUL-terminates within `len`.
    unsafe {
        cidlb13_strerror(err, buf.as_mut_ptr(), buf.len());
        buf[buf.len() - 1] = 0;
        format!("{err} {}", CStr::from_ptr(buf.as_ptr()).to_string_lossy())
    }
}

/// Random bytes from the shim's RNG (thread-safe).
pub fn random(buf: &mut [u8]) -> anyhow::Result<()> {
    // SAFETY: a valid buffer of that length.
    let r = unsafe { cidlb13_random(buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        anyhow::bail!("wolfSSL RNG: {}", strerror(r));
    }
    Ok(())
}

/// A DTLS 1.3-only WOLFSSL_CTX with the PSK callbacks (no certificates).
pub struct Conf {
    raw: *mut RawConf,
}

// SAFETY: a WOLFSSL_CTX is shared across threads by design (wolfSSL built with pthreads
// locks its reference count); after setup we never mutate it.
unsafe impl Send for Conf {}
// SAFETY: as above.
unsafe impl Sync for Conf {}

impl Conf {
    pub fn new(is_server: bool, psk: &[u8], identity: &[u8]) -> anyhow::Result<Conf> {
        let mut err: c_int = 0;
        // SAFETY: the slices are valid for the call; the shim copies PSK and identity.
        let raw = unsafe {
            cidlb13_conf_new(
                is_server as c_int,
                psk.as_ptr(),
                psk.len(),
                identity.as_ptr(),
                identity.len(),
                &mut err,
            )
        };
        if raw.is_null() {
            anyhow::bail!("wolfSSL DTLS 1.3 context: {}", strerror(err));
        }
        Ok(Conf { raw })
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        // SAFETY: allocated by cidlb13_conf_new; every Sess holds a borrow-free pointer, so
        // owners drop their sessions first (wolfSSL also reference-counts the CTX).
        unsafe { cidlb13_conf_free(self.raw) }
    }
}

/// One WOLFSSL object with its datagram I/O state.
pub struct Sess {
    raw: *mut RawSess,
}

// SAFETY: a WOLFSSL object may move between threads; it is never used by two at once (&mut).
unsafe impl Send for Sess {}

impl Sess {
    /// `recv_from_fd`: client mode (read the connected socket directly); otherwise datagrams
    /// are handed in with [`Sess::feed`] (server mode).
    pub fn new(conf: &Conf, fd: RawFd, recv_from_fd: bool) -> Result<Sess, i32> {
        let mut err: c_int = 0;
        // SAFETY: conf outlives the session (owners guarantee it).
        let raw = unsafe { cidlb13_sess_new(conf.raw, fd, recv_from_fd as c_int, &mut err) };
        if raw.is_null() {
            return Err(err);
        }
        Ok(Sess { raw })
    }
    pub fn set_fd(&mut self, fd: RawFd) {
        // SAFETY: valid session; the fd is only used for send/recv by the shim.
        unsafe { cidlb13_sess_set_fd(self.raw, fd) }
    }
    pub fn set_drop_permille(&mut self, p: u32) {
        // SAFETY: valid session.
        unsafe { cidlb13_sess_set_drop_permille(self.raw, p) }
    }
    /// Where replies go (server); also binds the HelloRetryRequest cookie to it.
    pub fn set_peer(&mut self, addr: SocketAddr) -> i32 {
        match addr {
            // SAFETY: valid session; the address bytes live for the call.
            SocketAddr::V4(a) => unsafe {
                cidlb13_sess_set_peer(self.raw, 4, a.ip().octets().as_ptr(), a.port(), 0, 0)
            },
            // SAFETY: as above.
            SocketAddr::V6(a) => unsafe {
                cidlb13_sess_set_peer(
                    self.raw,
                    6,
                    a.ip().octets().as_ptr(),
                    a.port(),
                    a.flowinfo(),
                    a.scope_id(),
                )
            },
        }
    }
    pub fn feed(&mut self, dgram: &[u8]) -> i32 {
        // SAFETY: valid session; the shim copies the datagram.
        unsafe { cidlb13_sess_feed(self.raw, dgram.as_ptr(), dgram.len()) }
    }
    /// Negotiate a CID; `cid` is the one the peer must put on records sent to us.
    pub fn use_cid(&mut self, cid: &[u8]) -> i32 {
        // SAFETY: valid session; wolfSSL copies the CID.
        unsafe { cidlb13_sess_use_cid(self.raw, cid.as_ptr(), cid.len()) }
    }
    /// `Some(cid)` when a CID is in use for records we send (possibly empty), else `None`.
    pub fn tx_cid(&mut self) -> Option<Vec<u8>> {
        let mut buf = [0u8; 255];
        let mut len = 0usize;
        // SAFETY: valid session, buffer and length.
        let r = unsafe { cidlb13_sess_get_tx_cid(self.raw, buf.as_mut_ptr(), buf.len(), &mut len) };
        (r == 1).then(|| buf[..len].to_vec())
    }
    /// 0 when the handshake is complete, else a [`Codes`] value or a wolfSSL error.
    pub fn handshake(&mut self) -> i32 {
        // SAFETY: valid session.
        unsafe { cidlb13_sess_handshake(self.raw) }
    }
    pub fn read(&mut self, buf: &mut [u8]) -> i32 {
        // SAFETY: valid session and buffer.
        unsafe { cidlb13_sess_read(self.raw, buf.as_mut_ptr(), buf.len()) }
    }
    pub fn write(&mut self, buf: &[u8]) -> i32 {
        // SAFETY: valid session and buffer.
        unsafe { cidlb13_sess_write(self.raw, buf.as_ptr(), buf.len()) }
    }
    pub fn close_notify(&mut self) {
        // SAFETY: valid session.
        unsafe { cidlb13_sess_close_notify(self.raw) }
    }
    /// wolfSSL's current retransmission timeout.
    pub fn timeout(&mut self) -> std::time::Duration {
        // SAFETY: valid session.
        let ms = unsafe { cidlb13_sess_timeout_ms(self.raw) };
        std::time::Duration::from_millis(ms.max(1) as u64)
    }
    /// The retransmission timer expired: wolfSSL resends its last flight.
    pub fn got_timeout(&mut self) -> i32 {
        // SAFETY: valid session.
        unsafe { cidlb13_sess_got_timeout(self.raw) }
    }
    /// Server: a ClientHello with a valid cookie arrived (past the HelloRetryRequest).
    pub fn is_stateful(&mut self) -> bool {
        // SAFETY: valid session.
        unsafe { cidlb13_sess_is_stateful(self.raw) != 0 }
    }
    /// [datagrams sent, datagrams handed to wolfSSL (after simulated loss), send errors,
    /// simulated drops]
    pub fn stats(&mut self) -> [u64; 4] {
        let mut out = [0u64; 4];
        // SAFETY: valid session; the shim writes exactly 4 values.
        unsafe { cidlb13_sess_stats(self.raw, out.as_mut_ptr()) };
        out
    }
    pub fn ciphersuite(&mut self) -> String {
        // SAFETY: valid session; the name is a static string or NULL.
        let p = unsafe { cidlb13_sess_ciphersuite(self.raw) };
        if p.is_null() {
            return "?".into();
        }
        // SAFETY: non-NULL, NUL-terminated, static.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Sess {
    fn drop(&mut self) {
        // SAFETY: allocated by cidlb13_sess_new, freed once.
        unsafe { cidlb13_sess_free(self.raw) }
    }
}

//! The Mbed TLS 3.6 backend (DTLS 1.2 with RFC 9146 CIDs): declarations of the C shim
//! (csrc/shim.c) and thin safe wrappers.
//!
//! The shim and Mbed TLS are not thread-safe (default config, no MBEDTLS_THREADING_C): every
//! call must happen while holding [`lock`]. The server is single-threaded; the client's session
//! threads take the lock around each call and release it while waiting on their sockets.

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[repr(C)]
pub struct RawConf {
    _p: [u8; 0],
}
#[repr(C)]
pub struct RawSess {
    _p: [u8; 0],
}

#[allow(dead_code)]
extern "C" {
    fn cidlb_global_init() -> c_int;
    fn cidlb_random(buf: *mut u8, len: usize) -> c_int;
    fn cidlb_strerror(err: c_int, buf: *mut c_char, len: usize);
    fn cidlb_version() -> *const c_char;
    fn cidlb_err_code(which: c_int) -> c_int;

    fn cidlb_conf_new(
        is_server: c_int,
        psk: *const u8,
        psk_len: usize,
        identity: *const u8,
        identity_len: usize,
        use_cid: c_int,
        cid_len: usize,
        hs_min_ms: u32,
        hs_max_ms: u32,
        debug_level: c_int,
        err: *mut c_int,
    ) -> *mut RawConf;
    fn cidlb_conf_free(c: *mut RawConf);

    fn cidlb_sess_new(
        c: *mut RawConf,
        fd: c_int,
        recv_from_fd: c_int,
        err: *mut c_int,
    ) -> *mut RawSess;
    fn cidlb_sess_free(s: *mut RawSess);
    fn cidlb_sess_set_fd(s: *mut RawSess, fd: c_int);
    fn cidlb_sess_set_drop_permille(s: *mut RawSess, p: c_uint);
    fn cidlb_sess_set_peer(
        s: *mut RawSess,
        family: c_int,
        ip: *const u8,
        port: u16,
        flowinfo: u32,
        scope_id: u32,
    ) -> c_int;
    fn cidlb_sess_set_transport_id(s: *mut RawSess, id: *const u8, len: usize) -> c_int;
    fn cidlb_sess_feed(s: *mut RawSess, data: *const u8, len: usize) -> c_int;
    fn cidlb_sess_set_cid(s: *mut RawSess, enable: c_int, cid: *const u8, len: usize) -> c_int;
    fn cidlb_sess_get_peer_cid(s: *mut RawSess, out: *mut u8, cap: usize, len: *mut usize)
        -> c_int;
    fn cidlb_sess_handshake(s: *mut RawSess) -> c_int;
    fn cidlb_sess_handshake_done(s: *mut RawSess) -> c_int;
    fn cidlb_sess_read(s: *mut RawSess, buf: *mut u8, len: usize) -> c_int;
    fn cidlb_sess_write(s: *mut RawSess, buf: *const u8, len: usize) -> c_int;
    fn cidlb_sess_close_notify(s: *mut RawSess) -> c_int;
    fn cidlb_sess_timer_state(s: *mut RawSess) -> c_int;
    fn cidlb_sess_ciphersuite(s: *mut RawSess) -> *const c_char;
    fn cidlb_sess_stats(s: *mut RawSess, out: *mut u64);
}

static LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    static HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Holding this means this thread may call into Mbed TLS.
pub struct Guard {
    _g: MutexGuard<'static, ()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        HELD.with(|h| h.set(false));
    }
}

/// Serialises all use of Mbed TLS (see module docs). Not reentrant.
pub fn lock() -> Guard {
    let g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    HELD.with(|h| h.set(true));
    Guard { _g: g }
}

/// Runs `f` under the lock, taking it only if this thread does not hold it already
/// (used by destructors, which may run either way).
fn with_lock<R>(f: impl FnOnce() -> R) -> R {
    if HELD.with(|h| h.get()) {
        f()
    } else {
        let _g = lock();
        f()
    }
}

/// Mbed TLS result codes we branch on, read from the headers via the shim.
#[derive(Clone, Copy, Debug)]
pub struct Codes {
    pub want_read: i32,
    pub want_write: i32,
    pub hello_verify_required: i32,
    pub client_reconnect: i32,
    pub peer_close_notify: i32,
    pub timeout: i32,
}

pub fn codes() -> Codes {
    // SAFETY: pure function of a constant.
    unsafe {
        Codes {
            want_read: cidlb_err_code(0),
            want_write: cidlb_err_code(1),
            hello_verify_required: cidlb_err_code(2),
            client_reconnect: cidlb_err_code(3),
            peer_close_notify: cidlb_err_code(4),
            timeout: cidlb_err_code(5),
        }
    }
}

/// psa_crypto_init + entropy + CTR-DRBG seeding. Idempotent.
pub fn global_init() -> anyhow::Result<()> {
    // SAFETY: guarded by the lock.
    let r = with_lock(|| unsafe { cidlb_global_init() });
    if r != 0 {
        anyhow::bail!("Mbed TLS init failed: {}", strerror(r));
    }
    Ok(())
}

pub fn version() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(cidlb_version()) }
        .to_string_lossy()
        .into_owned()
}

pub fn strerror(err: i32) -> String {
    let mut buf = [0 as c_char; 160];
    // SAFETY: buffer and its length are valid; mbedtls_strerror always NUL-terminates.
    unsafe {
        cidlb_strerror(err, buf.as_mut_ptr(), buf.len());
        format!(
            "-0x{:04x} {}",
            -err,
            CStr::from_ptr(buf.as_ptr()).to_string_lossy()
        )
    }
}

/// Random bytes from the shared CTR-DRBG. Caller must hold the lock.
pub fn random(buf: &mut [u8]) -> anyhow::Result<()> {
    // SAFETY: valid buffer.
    let r = unsafe { cidlb_random(buf.as_mut_ptr(), buf.len()) };
    if r != 0 {
        anyhow::bail!("ctr_drbg: {}", strerror(r));
    }
    Ok(())
}

pub struct ConfParams<'a> {
    pub is_server: bool,
    pub psk: &'a [u8],
    pub identity: &'a [u8],
    pub use_cid: bool,
    /// CID length we expect on records sent to us.
    pub cid_len: usize,
    pub hs_timeout_ms: (u32, u32),
    pub debug_level: i32,
}

/// An `mbedtls_ssl_config` (+ cookie context on servers).
pub struct Conf {
    raw: *mut RawConf,
}

// The raw pointer is only used under the global lock.
unsafe impl Send for Conf {}
unsafe impl Sync for Conf {}

impl Conf {
    /// Caller must hold the lock.
    pub fn new(p: &ConfParams) -> anyhow::Result<Conf> {
        let mut err: c_int = 0;
        // SAFETY: all slices are valid for the call; the config copies PSK and identity.
        let raw = unsafe {
            cidlb_conf_new(
                p.is_server as c_int,
                p.psk.as_ptr(),
                p.psk.len(),
                p.identity.as_ptr(),
                p.identity.len(),
                p.use_cid as c_int,
                p.cid_len,
                p.hs_timeout_ms.0,
                p.hs_timeout_ms.1,
                p.debug_level,
                &mut err,
            )
        };
        if raw.is_null() {
            anyhow::bail!("ssl config: {}", strerror(err));
        }
        Ok(Conf { raw })
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        // SAFETY: allocated by cidlb_conf_new; sessions using it are dropped first by owners.
        with_lock(|| unsafe { cidlb_conf_free(self.raw) })
    }
}

/// One `mbedtls_ssl_context` with its BIO state and timer. Every method requires the lock.
pub struct Sess {
    raw: *mut RawSess,
}

unsafe impl Send for Sess {}

impl Sess {
    /// `recv_from_fd`: client mode (read the connected socket directly); otherwise datagrams
    /// are handed in with [`Sess::feed`].
    pub fn new(conf: &Conf, fd: RawFd, recv_from_fd: bool) -> Result<Sess, i32> {
        let mut err: c_int = 0;
        // SAFETY: conf is alive for longer than the session (owners guarantee it).
        let raw = unsafe { cidlb_sess_new(conf.raw, fd, recv_from_fd as c_int, &mut err) };
        if raw.is_null() {
            return Err(err);
        }
        Ok(Sess { raw })
    }
    pub fn set_fd(&mut self, fd: RawFd) {
        unsafe { cidlb_sess_set_fd(self.raw, fd) }
    }
    pub fn set_drop_permille(&mut self, p: u32) {
        unsafe { cidlb_sess_set_drop_permille(self.raw, p) }
    }
    pub fn set_peer(&mut self, addr: SocketAddr) {
        let p = crate::util::peer_addr(addr);
        // SAFETY: valid session, lock held; the address bytes live for the call (copied).
        let r = unsafe {
            cidlb_sess_set_peer(
                self.raw,
                p.family,
                p.ip.as_ptr(),
                p.port,
                p.flowinfo,
                p.scope_id,
            )
        };
        debug_assert_eq!(r, 0);
    }
    pub fn set_transport_id(&mut self, id: &[u8]) -> i32 {
        unsafe { cidlb_sess_set_transport_id(self.raw, id.as_ptr(), id.len()) }
    }
    pub fn feed(&mut self, dgram: &[u8]) -> i32 {
        unsafe { cidlb_sess_feed(self.raw, dgram.as_ptr(), dgram.len()) }
    }
    pub fn set_cid(&mut self, enable: bool, cid: &[u8]) -> i32 {
        unsafe { cidlb_sess_set_cid(self.raw, enable as c_int, cid.as_ptr(), cid.len()) }
    }
    /// `Some(cid)` when a CID is in use for records we send (possibly empty), else `None`.
    pub fn peer_cid(&mut self) -> Option<Vec<u8>> {
        let mut buf = [0u8; 255];
        let mut len = 0usize;
        let r = unsafe { cidlb_sess_get_peer_cid(self.raw, buf.as_mut_ptr(), buf.len(), &mut len) };
        (r == 1).then(|| buf[..len].to_vec())
    }
    pub fn handshake(&mut self) -> i32 {
        unsafe { cidlb_sess_handshake(self.raw) }
    }
    #[allow(dead_code)]
    pub fn handshake_done(&mut self) -> bool {
        unsafe { cidlb_sess_handshake_done(self.raw) != 0 }
    }
    pub fn read(&mut self, buf: &mut [u8]) -> i32 {
        unsafe { cidlb_sess_read(self.raw, buf.as_mut_ptr(), buf.len()) }
    }
    pub fn write(&mut self, buf: &[u8]) -> i32 {
        unsafe { cidlb_sess_write(self.raw, buf.as_ptr(), buf.len()) }
    }
    pub fn close_notify(&mut self) -> i32 {
        unsafe { cidlb_sess_close_notify(self.raw) }
    }
    /// -1 no timer, 0 running, 1 intermediate expired, 2 final expired.
    pub fn timer_state(&mut self) -> i32 {
        unsafe { cidlb_sess_timer_state(self.raw) }
    }
    pub fn ciphersuite(&mut self) -> String {
        let p = unsafe { cidlb_sess_ciphersuite(self.raw) };
        if p.is_null() {
            return "?".into();
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
    /// [tx datagrams, rx datagrams, tx errors, simulated drops]
    #[allow(dead_code)]
    pub fn stats(&mut self) -> [u64; 4] {
        let mut out = [0u64; 4];
        unsafe { cidlb_sess_stats(self.raw, out.as_mut_ptr()) };
        out
    }
}

impl Drop for Sess {
    fn drop(&mut self) {
        with_lock(|| unsafe { cidlb_sess_free(self.raw) })
    }
}

/// The DTLS 1.2 client backend: every Mbed TLS call under the global lock, taken per call so
/// that waiting for datagrams (in client.rs) happens outside it.
pub struct Client {
    sess: Sess,
    c: Codes,
}

impl crate::client::ClientSess for Client {
    type Conf = Conf;
    const MIN_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

    fn conf(o: &crate::client::Opts) -> anyhow::Result<Conf> {
        // Retransmission timer: initial T/4 (100..1000 ms), doubling up to 2T (1..8 s).
        let t = o.timeout.as_millis().min(60_000) as u32;
        let _g = lock();
        Conf::new(&ConfParams {
            is_server: false,
            psk: &o.psk,
            identity: &o.psk_identity,
            use_cid: !o.no_cid,
            cid_len: 0,
            hs_timeout_ms: ((t / 4).clamp(100, 1000), (t * 2).clamp(1000, 8000)),
            debug_level: o.mbedtls_debug,
        })
    }

    fn open(conf: &Conf, fd: RawFd, o: &crate::client::Opts) -> Result<Self, String> {
        let _g = lock();
        let mut sess =
            Sess::new(conf, fd, true).map_err(|e| format!("ssl setup: {}", strerror(e)))?;
        sess.set_drop_permille(o.drop_permille);
        if !o.no_cid {
            // Request CID use; ours is zero-length (server sends to us without a CID).
            let r = sess.set_cid(true, &[]);
            if r != 0 {
                return Err(format!("set_cid: {}", strerror(r)));
            }
        }
        Ok(Client { sess, c: codes() })
    }

    fn handshake(&mut self) -> Result<bool, String> {
        let r = with_lock(|| self.sess.handshake());
        if r == 0 {
            return Ok(true);
        }
        if r == self.c.timeout {
            // Mbed TLS gave up after its retransmission timer reached its maximum (every
            // copy of one flight lost): the caller may start over on a new port.
            return Err(format!(
                "{}: {}",
                crate::client::HANDSHAKE_TIMEOUT,
                strerror(r)
            ));
        }
        if r != self.c.want_read && r != self.c.want_write {
            return Err(format!("handshake failed: {}", strerror(r)));
        }
        Ok(false)
    }

    fn handshake_wait(&mut self, _now: Instant) -> Result<Option<Duration>, String> {
        // Mbed TLS retransmits on its own timer (checked at every handshake step).
        Ok(Some(Duration::MAX))
    }

    fn negotiated(&mut self) -> (Option<Vec<u8>>, String) {
        let _g = lock();
        (self.sess.peer_cid(), self.sess.ciphersuite())
    }

    fn set_fd(&mut self, fd: RawFd) {
        with_lock(|| self.sess.set_fd(fd))
    }

    fn random(&mut self, buf: &mut [u8]) -> Result<(), String> {
        with_lock(|| random(buf)).map_err(|e| e.to_string())
    }

    fn write(&mut self, msg: &[u8]) -> Result<bool, String> {
        let w = with_lock(|| self.sess.write(msg));
        if w >= 0 {
            return Ok(true);
        }
        if w != self.c.want_write && w != self.c.want_read {
            return Err(format!("write failed: {}", strerror(w)));
        }
        Ok(false)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        let c = self.c;
        let r = with_lock(|| self.sess.read(buf));
        if r > 0 {
            Ok(Some(r as usize))
        } else if r == c.peer_close_notify {
            Err("server sent close_notify".into())
        } else if r != c.want_read && r != c.want_write && r != 0 && r != c.timeout {
            Err(format!("read failed: {}", strerror(r)))
        } else {
            Ok(None)
        }
    }

    fn finish(mut self, notify: bool) {
        let _g = lock();
        if notify {
            self.sess.close_notify();
        }
        drop(self.sess);
    }
}

/// The DTLS 1.2 server backend (the server is single-threaded and holds the lock throughout).
pub struct Server {
    sess: Sess,
    c: Codes,
}

impl crate::server::ServerSess for Server {
    type Conf = Conf;
    type Guard = Guard;
    const MIN_DATAGRAM: usize = crate::server::PLAINTEXT_HEADER;
    const NEW_SESSION_ON_CLIENT_HELLO: bool = false;

    fn setup(o: &crate::server::Opts) -> anyhow::Result<(Guard, Conf)> {
        let guard = lock();
        let conf = Conf::new(&ConfParams {
            is_server: true,
            psk: &o.psk,
            identity: &o.psk_identity,
            use_cid: !o.no_cid,
            cid_len: o.cid_len,
            hs_timeout_ms: (500, 4000),
            debug_level: o.mbedtls_debug,
        })?;
        Ok((guard, conf))
    }

    fn library() -> String {
        format!("mbedtls={}", version())
    }

    /// RFC 9146 record: type 25, version FE FD, epoch and sequence (8 bytes), then the CID
    /// and the length (2 bytes).
    fn record_cid(d: &[u8], l: usize) -> Option<&[u8]> {
        const CT_TLS12_CID: u8 = 25;
        (d.len() >= 11 + l + 2 && d[0] == CT_TLS12_CID && d[1] == 0xfe && d[2] == 0xfd)
            .then(|| &d[11..11 + l])
    }

    fn random(buf: &mut [u8]) -> bool {
        random(buf).is_ok()
    }

    fn open(conf: &Conf, fd: RawFd, peer: SocketAddr, cid: &[u8]) -> Result<Self, String> {
        let mut sess = Sess::new(conf, fd, false).map_err(|e| format!("setup {}", strerror(e)))?;
        sess.set_peer(peer);
        sess.set_drop_permille(0); // server-side drops are simulated in server.rs
        let r = sess.set_transport_id(&crate::util::addr_bytes(&peer));
        if r != 0 {
            return Err(format!("transport_id {}", strerror(r)));
        }
        if !cid.is_empty() {
            let r = sess.set_cid(true, cid);
            if r != 0 {
                return Err(format!("set_cid {}", strerror(r)));
            }
        }
        Ok(Server { sess, c: codes() })
    }

    fn feed(&mut self, d: &[u8]) -> bool {
        self.sess.feed(d) == 0
    }

    fn handshake(&mut self) -> crate::server::Hs {
        use crate::server::Hs;
        let r = self.sess.handshake();
        if r == 0 {
            Hs::Done
        } else if r == self.c.want_read || r == self.c.want_write {
            // Past the cookie check (else HELLO_VERIFY_REQUIRED): a real session.
            Hs::Pending { stateful: true }
        } else if r == self.c.hello_verify_required {
            Hs::Stateless
        } else {
            Hs::Failed(format!("handshake failed: {}", strerror(r)))
        }
    }

    fn ciphersuite(&mut self) -> String {
        self.sess.ciphersuite()
    }

    fn read(&mut self, buf: &mut [u8]) -> crate::server::Rd {
        use crate::server::Rd;
        let c = self.c;
        let r = self.sess.read(buf);
        if r > 0 {
            Rd::Data(r as usize)
        } else if r == c.want_read || r == c.want_write || r == 0 {
            Rd::Again
        } else if r == c.client_reconnect {
            Rd::Reconnect
        } else if r == c.peer_close_notify {
            Rd::Closed
        } else {
            Rd::Failed(format!("read failed: {}", strerror(r)))
        }
    }

    fn write(&mut self, d: &[u8]) -> (i32, Option<String>) {
        let w = self.sess.write(d);
        let err =
            (w < 0 && w != self.c.want_write).then(|| format!("write failed: {}", strerror(w)));
        (w, err)
    }

    fn set_peer(&mut self, peer: SocketAddr) -> Result<(), String> {
        self.sess.set_peer(peer);
        Ok(())
    }

    fn set_cid(&mut self, cid: &[u8]) -> Result<(), String> {
        match self.sess.set_cid(true, cid) {
            0 => Ok(()),
            r => Err(format!("set_cid: {}", strerror(r))),
        }
    }

    fn close_notify(&mut self) {
        self.sess.close_notify();
    }

    fn retransmit_due(&mut self, _now: Instant) -> Option<String> {
        // 2: the final timer expired; the next handshake step resends the flight.
        (self.sess.timer_state() == 2).then(String::new)
    }
}

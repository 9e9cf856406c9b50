//! Declarations of the wolfSSL shim (csrc/wolf_shim.c, the DTLS 1.3 backend) and thin safe
//! wrappers; the counterpart of ffi.rs.
//!
//! No global lock: wolfSSL is built with pthreads, a [`Conf`] (WOLFSSL_CTX) may be shared by
//! threads, and each [`Sess`] (WOLFSSL) is owned and used by one thread at a time (`Send`,
//! not `Sync`).

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

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
        let p = crate::util::peer_addr(addr);
        // SAFETY: valid session; the address bytes live for the call (the shim copies them).
        unsafe {
            cidlb13_sess_set_peer(
                self.raw,
                p.family,
                p.ip.as_ptr(),
                p.port,
                p.flowinfo,
                p.scope_id,
            )
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

/// The DTLS 1.3 client backend. wolfSSL needs no global lock: each session's WOLFSSL object
/// lives on one worker thread.
pub struct Client {
    sess: Sess,
    c: Codes,
    /// Datagrams received when the retransmission timer was last (re)started.
    rx: u64,
    /// When wolfSSL's retransmission timer runs out (None: not started).
    timer: Option<Instant>,
}

impl crate::client::ClientSess for Client {
    type Conf = Conf;
    /// wolfSSL's timer counts whole seconds (1 s, doubling; it gives up past 64 s), so a
    /// handshake that loses a few datagrams takes seconds: allow 30 s (the server drops an
    /// unfinished handshake after 30 s too).
    const MIN_HANDSHAKE: Duration = Duration::from_secs(30);

    fn conf(o: &crate::client::Opts) -> anyhow::Result<Conf> {
        global_init()?;
        Conf::new(false, &o.psk, &o.psk_identity)
    }

    fn open(conf: &Conf, fd: RawFd, o: &crate::client::Opts) -> Result<Self, String> {
        let mut sess =
            Sess::new(conf, fd, true).map_err(|e| format!("ssl setup: {}", strerror(e)))?;
        sess.set_drop_permille(o.drop_permille);
        if !o.no_cid {
            // Request CID use; ours is zero-length (the server sends to us without a CID).
            let r = sess.use_cid(&[]);
            if r != 0 {
                return Err(format!("use_cid: {}", strerror(r)));
            }
        }
        Ok(Client {
            sess,
            c: codes(),
            rx: 0,
            timer: None,
        })
    }

    fn handshake(&mut self) -> Result<bool, String> {
        let r = self.sess.handshake();
        if r == 0 {
            return Ok(true);
        }
        if r != self.c.want_read && r != self.c.want_write {
            return Err(format!("handshake failed: {}", strerror(r)));
        }
        Ok(false)
    }

    /// With non-blocking I/O wolfSSL retransmits only when told that its timer ran out
    /// (wolfSSL_dtls_got_timeout); the timer restarts when a datagram arrives.
    fn handshake_wait(&mut self, now: Instant) -> Result<Option<Duration>, String> {
        let n = self.sess.stats()[1];
        match self.timer {
            Some(t) if n == self.rx => {
                if now < t {
                    return Ok(Some(t - now));
                }
                let r = self.sess.got_timeout();
                if r != 0 && r != self.c.want_read && r != self.c.want_write {
                    return Err(format!("handshake retransmission: {}", strerror(r)));
                }
                self.timer = Some(now + self.sess.timeout());
                Ok(None)
            }
            _ => {
                self.rx = n;
                let t = now + self.sess.timeout();
                self.timer = Some(t);
                Ok(Some(t - now))
            }
        }
    }

    fn negotiated(&mut self) -> (Option<Vec<u8>>, String) {
        (self.sess.tx_cid(), self.sess.ciphersuite())
    }

    fn set_fd(&mut self, fd: RawFd) {
        self.sess.set_fd(fd)
    }

    fn random(&mut self, buf: &mut [u8]) -> Result<(), String> {
        random(buf).map_err(|e| e.to_string())
    }

    fn write(&mut self, msg: &[u8]) -> Result<bool, String> {
        let w = self.sess.write(msg);
        if w >= 0 {
            return Ok(true);
        }
        if w != self.c.want_write && w != self.c.want_read {
            return Err(format!("write failed: {}", strerror(w)));
        }
        Ok(false)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, String> {
        let r = self.sess.read(buf);
        if r > 0 {
            Ok(Some(r as usize))
        } else if r == self.c.closed {
            Err("server sent close_notify".into())
        } else if r != self.c.want_read && r != self.c.want_write {
            Err(format!("read failed: {}", strerror(r)))
        } else {
            Ok(None)
        }
    }

    fn finish(mut self, notify: bool) {
        if notify {
            self.sess.close_notify();
        }
    }
}

/// RFC 9147 §4 unified header, first byte `0 0 1 C S L E E`: the top three bits are 001, C
/// says a connection ID follows the first byte.
const UNIFIED_MASK: u8 = 0xe0;
const UNIFIED_FIXED: u8 = 0x20;
const UNIFIED_C: u8 = 0x10;
/// The CID of a unified-header record carrying one, given our CID length `l`.
pub(crate) fn unified_cid(d: &[u8], l: usize) -> Option<&[u8]> {
    let b = *d.first()?;
    if b & UNIFIED_MASK != UNIFIED_FIXED || b & UNIFIED_C == 0 {
        return None;
    }
    // Shortest CID record: first byte, CID, an 8-bit sequence number, no length field.
    d.get(1..1 + l).filter(|_| d.len() > 1 + l)
}

/// The DTLS 1.3 server backend.
pub struct Server {
    sess: Sess,
    c: Codes,
    /// When wolfSSL's retransmission timer runs out (restarted after every `process`).
    timer: Instant,
    /// Datagrams sent before this `process` (debug).
    tx0: u64,
}

impl crate::server::ServerSess for Server {
    type Conf = Conf;
    type Guard = ();
    const MIN_DATAGRAM: usize = 1;
    const NEW_SESSION_ON_CLIENT_HELLO: bool = true;

    fn setup(o: &crate::server::Opts) -> anyhow::Result<((), Conf)> {
        global_init()?;
        Ok(((), Conf::new(true, &o.psk, &o.psk_identity)?))
    }

    fn library() -> String {
        format!("dtls=1.3 wolfssl={}", version())
    }

    fn record_cid(d: &[u8], l: usize) -> Option<&[u8]> {
        unified_cid(d, l)
    }

    fn random(buf: &mut [u8]) -> bool {
        random(buf).is_ok()
    }

    fn open(conf: &Conf, fd: RawFd, peer: SocketAddr, cid: &[u8]) -> Result<Self, String> {
        let mut sess = Sess::new(conf, fd, false).map_err(|e| format!("setup {}", strerror(e)))?;
        if sess.set_peer(peer) != 0 {
            return Err("set_peer".into());
        }
        if !cid.is_empty() {
            let r = sess.use_cid(cid);
            if r != 0 {
                return Err(format!("use_cid {}", strerror(r)));
            }
        }
        Ok(Server {
            sess,
            c: codes(),
            timer: Instant::now(),
            tx0: 0,
        })
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
            Hs::Pending {
                stateful: self.sess.is_stateful(),
            }
        } else {
            Hs::Failed(format!("handshake failed: {}", strerror(r)))
        }
    }

    fn ciphersuite(&mut self) -> String {
        self.sess.ciphersuite()
    }

    fn read(&mut self, buf: &mut [u8]) -> crate::server::Rd {
        use crate::server::Rd;
        let r = self.sess.read(buf);
        if r > 0 {
            Rd::Data(r as usize)
        } else if r == self.c.want_read || r == self.c.want_write {
            Rd::Again
        } else if r == self.c.closed {
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
        match self.sess.set_peer(peer) {
            0 => Ok(()),
            _ => Err(format!("set_peer {peer} failed")),
        }
    }

    fn set_cid(&mut self, _cid: &[u8]) -> Result<(), String> {
        // Never asked: read() does not report Rd::Reconnect (see NEW_SESSION_ON_CLIENT_HELLO).
        Err("new CID on a live session: not supported by the wolfSSL backend".into())
    }

    fn close_notify(&mut self) {
        self.sess.close_notify();
    }

    fn retransmit_due(&mut self, now: Instant) -> Option<String> {
        if now < self.timer {
            return None;
        }
        // With non-blocking I/O wolfSSL resends its last flight only when told so.
        let tx = self.sess.stats()[0];
        let r = self.sess.got_timeout();
        let sent = self.sess.stats()[0] - tx;
        Some(format!(" r={r} datagrams={sent}"))
    }

    fn begin(&mut self) {
        self.tx0 = self.sess.stats()[0];
    }

    fn end(&mut self, established: bool) -> Option<String> {
        self.timer = Instant::now() + self.sess.timeout();
        if established {
            return None;
        }
        let sent = self.sess.stats()[0] - self.tx0;
        let stateful = self.sess.is_stateful();
        Some(format!(" sent={sent} stateful={stateful}"))
    }
}

#[cfg(test)]
mod tests {
    use super::unified_cid;

    #[test]
    fn unified_header_cid() {
        // 0x3e: 001 C=1 S=1 L=1 epoch 2; CID 01aabbccddee, then seq and length.
        let rec = [0x3e, 1, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0, 5, 0, 17];
        assert_eq!(unified_cid(&rec, 6), Some(&rec[1..7]));
        // C clear (0x2e), DTLSCiphertext without CID; a 1.2 CID record (type 25); too short.
        assert_eq!(unified_cid(&[0x2e, 1, 2, 3, 4, 5, 6, 7, 8], 6), None);
        assert_eq!(
            unified_cid(&[0x19, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1], 6),
            None
        );
        assert_eq!(unified_cid(&rec[..7], 6), None);
        assert_eq!(unified_cid(&[], 6), None);
    }
}

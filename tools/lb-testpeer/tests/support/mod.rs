//! Helpers shared by the peer's end-to-end tests: start a server process and read its log,
//! run a client process with a time limit, read the client's JSON report.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cidlb-testpeer");

pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `cidlb-testpeer server --listen <ip>:0 ...` and waits for its `listening` line.
    pub fn start(ip: &str, node_id: u64, extra: &[&str]) -> Option<Server> {
        let listen = if ip.contains(':') {
            format!("[{ip}]:0")
        } else {
            format!("{ip}:0")
        };
        let mut child = Command::new(BIN)
            .args([
                "server",
                "--listen",
                &listen,
                "--node-id",
                &node_id.to_string(),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(i) = line.find("listening addr=") {
                        let a = line[i + 15..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let _ = tx.send(a);
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut srv = Server {
            child: Some(child),
            addr: "127.0.0.1:9".parse().unwrap(),
            lines,
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(a) => {
                srv.addr = a.parse().expect("listening address");
                Some(srv)
            }
            Err(_) => {
                eprintln!("server did not start: {:?}", srv.lines.lock().unwrap());
                None
            }
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// SIGTERM, wait up to 5 s, else SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the client with a hard time limit.
pub fn client(args: &[&str], limit: Duration) -> Out {
    let mut child = Command::new(BIN)
        .arg("client")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let st = child.wait().unwrap();
            panic!("client exceeded {limit:?} ({st:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// Value of `"key":<value>` in a flat JSON line (string quotes stripped); enough for our output.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let i = line.find(&pat)? + pat.len();
    let rest = &line[i..];
    if let Some(r) = rest.strip_prefix('"') {
        return Some(&r[..r.find('"')?]);
    }
    let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
    Some(&rest[..end])
}

pub fn session_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.starts_with("{\"session\""))
        .collect()
}

pub fn summary(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("{\"summary\""))
        .expect("summary line")
}

/// Asserts that a client run succeeded; on failure shows its output and the server's log.
#[track_caller]
pub fn assert_client_ok(out: &Out, srv: &Server) {
    assert!(
        out.status.success(),
        "client failed: {}\n{}\n{:#?}",
        out.stdout,
        out.stderr,
        srv.log()
    );
}

/// Two sequential sessions from one source port, the first without close_notify (the
/// server sees a new ClientHello from an established session's address and must start over
/// with a fresh CID). `dtls` selects the version on both sides. Returns the server, running.
pub fn port_reuse_reconnects(dtls: &[&str], node_id: u64) -> Server {
    let srv = Server::start("127.0.0.1", node_id, dtls).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    let addr = srv.addr.to_string();
    let mut args = dtls.to_vec();
    args.extend([
        "--server",
        &addr,
        "--sessions",
        "2",
        "--messages",
        "3",
        "--parallel",
        "1",
        "--bind",
        &bind,
        "--no-close-notify",
        "--json",
    ]);
    let out = client(&args, Duration::from_secs(60));
    assert_client_ok(&out, &srv);
    let s = session_lines(&out.stdout);
    assert_ne!(field(s[0], "server_cid"), field(s[1], "server_cid"));
    assert_eq!(srv.count("session reconnect"), 1, "{:#?}", srv.log());
    srv
}

/// Server and client each drop `permille`/1000 of the datagrams they receive: the library's
/// handshake timers must complete every handshake (server node 9, 4 sessions), and message
/// retries must recover nearly every echo (a message fails only if all 4 attempts lose a
/// datagram, so allow a few). `dtls` selects the version on both sides.
pub fn lossy_link(dtls: &[&str], permille: &str) {
    let mut srv_args = dtls.to_vec();
    srv_args.extend(["--drop-permille", permille]);
    let mut srv = Server::start("127.0.0.1", 9, &srv_args).unwrap();
    let addr = srv.addr.to_string();
    let mut args = dtls.to_vec();
    args.extend([
        "--server",
        &addr,
        "--sessions",
        "4",
        "--messages",
        "20",
        "--rebind-every",
        "4",
        "--timeout-ms",
        "300",
        "--drop-permille",
        permille,
        "--json",
    ]);
    let out = client(&args, Duration::from_secs(120));
    let sessions = session_lines(&out.stdout);
    assert_eq!(sessions.len(), 4, "{}\n{}", out.stdout, out.stderr);
    for s in &sessions {
        assert!(
            field(s, "server_cid").unwrap().starts_with("09"),
            "handshake done: {s}\n{:#?}",
            srv.log()
        );
        assert_eq!(field(s, "node"), Some("9"), "{s}");
        assert_eq!(field(s, "error"), Some("null"), "{s}");
    }
    let sum = summary(&out.stdout);
    let ok: u32 = field(sum, "messages_ok").unwrap().parse().unwrap();
    let retries: u32 = field(sum, "retries").unwrap().parse().unwrap();
    assert!(ok >= 76, "{sum}");
    assert!(
        retries > 0,
        "loss was simulated, so some retries must have happened: {sum}"
    );
    assert_eq!(
        out.status.code(),
        Some(if ok == 80 { 0 } else { 1 }),
        "{sum}"
    );
    assert!(srv.count("peer moved") >= 4, "{:#?}", srv.log());
    srv.stop();
}

//! cidlb-testpeer: a DTLS peer with Connection IDs, for testing a CID-aware UDP load balancer:
//! DTLS 1.2 + RFC 9146 on Mbed TLS 3.6.5 (the default), or DTLS 1.3 (RFC 9147) on wolfSSL 5.9.4
//! with `--dtls 1.3`. Both backends have the same CLI, log lines and JSON report.
//!
//! * `server`: per-node DTLS echo server; its CID starts with the node id.
//! * `client`: runs sessions against a server (or a load balancer in front of servers),
//!   optionally moving each session to a new UDP source port every K messages.

mod client;
mod mbedtls;
mod server;
mod util;
mod wolf;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;

const DEFAULT_PSK_IDENTITY: &str = "cidlb";
const DEFAULT_PSK_HEX: &str = "000102030405060708090a0b0c0d0e0f";

#[derive(Parser)]
#[command(
    name = "cidlb-testpeer",
    version,
    about = "DTLS + Connection ID test peer: DTLS 1.2 (Mbed TLS) or DTLS 1.3 (wolfSSL)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The DTLS version, and with it the backend.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Dtls {
    /// DTLS 1.2 with RFC 9146 CIDs (record type 25), Mbed TLS 3.6.5.
    #[value(name = "1.2")]
    V12,
    /// DTLS 1.3 with RFC 9147 CIDs (unified header, C bit), wolfSSL 5.9.4.
    #[value(name = "1.3")]
    V13,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// DTLS version: 1.2 (Mbed TLS) or 1.3 (wolfSSL). A 1.3 server rejects 1.2 clients.
    #[arg(long, value_enum, default_value = "1.2")]
    dtls: Dtls,
    /// PSK identity.
    #[arg(long, default_value = DEFAULT_PSK_IDENTITY)]
    psk_identity: String,
    /// PSK as hex.
    #[arg(long, default_value = DEFAULT_PSK_HEX)]
    psk: String,
    /// Plain DTLS 1.2: do not negotiate a Connection ID.
    #[arg(long)]
    no_cid: bool,
    /// Per-record log lines on stderr.
    #[arg(long)]
    debug: bool,
    /// Mbed TLS debug threshold (0 = off, 1..4), printed on stderr (DTLS 1.2 only).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=4))]
    mbedtls_debug: i32,
    /// Test aid: drop this many of every 1000 received datagrams (exercises retransmission).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=900))]
    drop_permille: u32,
}

#[derive(Subcommand)]
enum Cmd {
    /// DTLS echo server for one cluster node (one unconnected UDP socket).
    Server {
        /// Address to listen on (IPv4 or IPv6; port 0 picks a free port, see the `listening` line).
        #[arg(long)]
        listen: SocketAddr,
        /// This node's id; echoes are prefixed `node=<id> ` and the CID starts with it.
        #[arg(long)]
        node_id: u64,
        /// Bytes of the node id at the start of the CID (big-endian).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=8))]
        node_id_length: u8,
        /// Total length of the server's CID (node id bytes + random bytes).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(1..=32))]
        cid_length: u8,
        /// Seconds without traffic after which a session is dropped.
        #[arg(long, default_value_t = 120)]
        idle_timeout_secs: u64,
        /// Maximum number of concurrent sessions.
        #[arg(long, default_value_t = 10000)]
        max_sessions: usize,
        #[command(flatten)]
        common: Common,
    },
    /// Runs DTLS sessions against a server and checks every echo.
    Client {
        /// Server (or load balancer) address.
        #[arg(long)]
        server: SocketAddr,
        /// Number of DTLS sessions.
        #[arg(long, default_value_t = 1)]
        sessions: u32,
        /// Messages per session (each one application record, echoed back).
        #[arg(long, default_value_t = 10)]
        messages: u32,
        /// Move the session to a new UDP source port every K messages (NAT rebinding).
        #[arg(long)]
        rebind_every: Option<u32>,
        /// Pause between a session's messages, in milliseconds (pacing).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Per-attempt echo timeout in milliseconds (3 retries per message).
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Sessions run concurrently (threads).
        #[arg(long, default_value_t = 8)]
        parallel: u32,
        /// Payload bytes per message (minimum: the message tag, ~20 bytes; at most 1400, whose
        /// record and its echo still fit a 1500-byte path unfragmented).
        #[arg(long, default_value_t = 32)]
        payload_len: usize,
        /// One JSON object per session per line, then a summary line.
        #[arg(long)]
        json: bool,
        /// Local address of each session's first socket (e.g. 127.0.0.1:40000 to reuse a
        /// port across sequential sessions; rebinding always picks a fresh ephemeral port).
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// End sessions without sending close_notify.
        #[arg(long)]
        no_close_notify: bool,
        /// End a session after this many failed messages (the rest count as failed).
        #[arg(long, value_name = "K")]
        give_up_after: Option<u32>,
        #[command(flatten)]
        common: Common,
    },
}

fn psk_bytes(c: &Common) -> anyhow::Result<Vec<u8>> {
    let psk = util::from_hex(&c.psk).ok_or_else(|| anyhow::anyhow!("--psk is not valid hex"))?;
    anyhow::ensure!(
        !psk.is_empty() && psk.len() <= 64,
        "--psk must be 1..=64 bytes"
    );
    anyhow::ensure!(
        !c.psk_identity.is_empty() && c.psk_identity.len() <= 128,
        "--psk-identity must be 1..=128 bytes"
    );
    Ok(psk)
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    mbedtls::global_init()?;
    let common = match &cli.cmd {
        Cmd::Server { common, .. } | Cmd::Client { common, .. } => common,
    };
    let v13 = common.dtls == Dtls::V13;
    anyhow::ensure!(
        !(v13 && common.mbedtls_debug > 0),
        "--mbedtls-debug applies to the Mbed TLS backend (--dtls 1.2) only"
    );
    match cli.cmd {
        Cmd::Server {
            listen,
            node_id,
            node_id_length,
            cid_length,
            idle_timeout_secs,
            max_sessions,
            common,
        } => {
            let psk = psk_bytes(&common)?;
            let b = node_id_length as usize;
            let l = cid_length as usize;
            if !common.no_cid {
                anyhow::ensure!(b < l, "--node-id-length must be smaller than --cid-length");
                anyhow::ensure!(
                    b == 8 || node_id < (1u64 << (8 * b)),
                    "--node-id {node_id} does not fit in {b} byte(s)"
                );
            }
            let o = server::Opts {
                listen,
                node_id,
                node_id_len: b,
                cid_len: l,
                psk,
                psk_identity: common.psk_identity.into_bytes(),
                no_cid: common.no_cid,
                idle_timeout: std::time::Duration::from_secs(idle_timeout_secs.max(1)),
                max_sessions: max_sessions.max(1),
                debug: common.debug,
                mbedtls_debug: common.mbedtls_debug,
                drop_permille: common.drop_permille,
            };
            if v13 {
                server::run::<wolf::Server>(o)?;
            } else {
                server::run::<mbedtls::Server>(o)?;
            }
            Ok(0)
        }
        Cmd::Client {
            server,
            sessions,
            messages,
            rebind_every,
            interval_ms,
            timeout_ms,
            parallel,
            payload_len,
            json,
            bind,
            no_close_notify,
            give_up_after,
            common,
        } => {
            let psk = psk_bytes(&common)?;
            anyhow::ensure!(
                (1..=100_000).contains(&sessions),
                "--sessions must be 1..=100000"
            );
            anyhow::ensure!(messages <= 1_000_000, "--messages must be <= 1000000");
            anyhow::ensure!(
                (50..=60_000).contains(&timeout_ms),
                "--timeout-ms must be 50..=60000"
            );
            anyhow::ensure!(payload_len <= 1400, "--payload-len must be <= 1400");
            if let Some(b) = bind {
                anyhow::ensure!(
                    b.is_ipv4() == server.is_ipv4(),
                    "--bind and --server differ in family"
                );
                anyhow::ensure!(
                    b.port() == 0 || parallel == 1 || sessions == 1,
                    "--bind with a fixed port needs --parallel 1"
                );
            }
            let o = client::Opts {
                server,
                sessions,
                messages,
                rebind_every: rebind_every.filter(|k| *k > 0),
                interval: std::time::Duration::from_millis(interval_ms.min(60_000)),
                timeout: std::time::Duration::from_millis(timeout_ms),
                parallel: parallel.clamp(1, 256),
                payload_len,
                json,
                psk,
                psk_identity: common.psk_identity.into_bytes(),
                no_cid: common.no_cid,
                debug: common.debug,
                mbedtls_debug: common.mbedtls_debug,
                drop_permille: common.drop_permille,
                bind,
                no_close_notify,
                give_up_after: give_up_after.filter(|k| *k > 0),
            };
            let all_ok = if v13 {
                client::run::<wolf::Client>(o)?
            } else {
                client::run::<mbedtls::Client>(o)?
            };
            Ok(if all_ok { 0 } else { 1 })
        }
    }
}

//! The DTLS test peer (`cidlb-testpeer`, lb-testpeer on Mbed TLS) in lab namespaces: echo
//! servers on the nodes, clients on the client, and the clients' JSON reports. Shared by the
//! e2e tests and `cargo xtask demo`; the binary is a parameter.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;

use crate::{ChildGuard, NetNs, PORT};

fn utf8(bin: &Path) -> Result<&str, String> {
    bin.to_str()
        .ok_or_else(|| format!("{} is not UTF-8", bin.display()))
}

/// Starts a DTLS echo server for node `node_id` in `ns`, on both families at [`PORT`]; its CIDs
/// start with the node id. Returns once it logs `listening`. Its later log lines go to `log`
/// (or are dropped).
pub fn server(
    bin: &Path,
    ns: &NetNs,
    node_id: u32,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<ChildGuard, String> {
    server_on(bin, ns, node_id, PORT, extra, log)
}

/// As [`server`], listening on `port` (e.g. a DTLS 1.3 server beside a 1.2 one on [`PORT`]).
pub fn server_on(
    bin: &Path,
    ns: &NetNs,
    node_id: u32,
    port: u16,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<ChildGuard, String> {
    server_at(bin, ns, node_id, &format!("[::]:{port}"), extra, log)
}

/// As [`server`], listening on `listen` only (a tunnel node's server binds the VIP, so it
/// answers from it).
pub fn server_at(
    bin: &Path,
    ns: &NetNs,
    node_id: u32,
    listen: &str,
    extra: &[&str],
    log: Option<&Path>,
) -> Result<ChildGuard, String> {
    let mut child = ns
        .command(utf8(bin)?)
        .args([
            "server",
            "--listen",
            listen,
            "--node-id",
            &node_id.to_string(),
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {} server in netns {}: {e}", bin.display(), ns.name))?;
    let err = child.stderr.take().expect("stderr piped");
    let guard = ChildGuard(child);
    let mut file = match log {
        Some(p) => Some(std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if line.contains("listening") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10)).map_err(|_| {
        format!(
            "the DTLS server for node {node_id} in netns {} did not log `listening` within 10 s",
            ns.name
        )
    })?;
    Ok(guard)
}

/// What a client run reported: one JSON object per session and the summary.
#[derive(Debug)]
pub struct ClientRun {
    /// The client exited 0 (every session ok).
    pub ok: bool,
    pub sessions: Vec<Value>,
    pub summary: Value,
}

impl ClientRun {
    /// Parses the client's `--json` output (one object per line, the last `{"summary": ..}`).
    pub fn parse(text: &str, ok: bool) -> Result<Self, String> {
        let mut sessions = Vec::new();
        let mut summary = Value::Null;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).map_err(|e| format!("bad client JSON {line:?}: {e}"))?;
            match v.get("summary") {
                Some(s) => summary = s.clone(),
                None => sessions.push(v),
            }
        }
        if summary.is_null() {
            return Err(format!("no summary in the client's output:\n{text}"));
        }
        Ok(Self {
            ok,
            sessions,
            summary,
        })
    }

    /// The node id a session's server CID names (its first byte, as the lab's servers issue
    /// them); `None` for a session without a CID.
    pub fn cid_node(session: &Value) -> Option<u64> {
        let cid = session["server_cid"].as_str()?;
        u64::from_str_radix(cid.get(..2)?, 16).ok()
    }

    /// The nodes that answered a session's records (from the node name each echo carries).
    pub fn answered_by(session: &Value) -> Vec<u64> {
        session["nodes"]
            .as_array()
            .map(|a| a.iter().filter_map(|n| n.as_str()?.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Every session whose echoes did not all come from one node, or (with a CID) not from the
    /// node its CID names: one line each. Empty when every echo came from the right node.
    pub fn misrouted(&self) -> Vec<String> {
        let mut bad = Vec::new();
        for s in &self.sessions {
            let nodes = Self::answered_by(s);
            match (nodes.as_slice(), Self::cid_node(s)) {
                ([n], Some(c)) if *n != c => bad.push(format!(
                    "session {}: answered by node {n} but its CID {} names node {c}",
                    s["session"], s["server_cid"]
                )),
                ([_], _) => {}
                ([], _) if s["ok"].as_u64() == Some(0) => {}
                _ => bad.push(format!(
                    "session {}: answered by nodes {nodes:?}, not by one node",
                    s["session"]
                )),
            }
        }
        bad
    }
}

/// Runs `BIN client --server SERVER --json ARGS` in `ns` to the end.
pub fn client(bin: &Path, ns: &NetNs, server: &str, args: &[&str]) -> Result<ClientRun, String> {
    let out = ns
        .command(utf8(bin)?)
        .args(["client", "--server", server, "--json"])
        .args(args)
        .output()
        .map_err(|e| format!("run {} client in netns {}: {e}", bin.display(), ns.name))?;
    ClientRun::parse(&String::from_utf8_lossy(&out.stdout), out.status.success()).map_err(|e| {
        format!(
            "{e}\nclient stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts a client in the background with its JSON report going to `out` (read it with
/// [`ClientRun::parse`] once the child has exited).
pub fn spawn_client(
    bin: &Path,
    ns: &NetNs,
    server: &str,
    args: &[&str],
    out: &Path,
) -> Result<ChildGuard, String> {
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    ns.command(utf8(bin)?)
        .args(["client", "--server", server, "--json"])
        .args(args)
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .map(ChildGuard)
        .map_err(|e| format!("spawn {} client in netns {}: {e}", bin.display(), ns.name))
}

#[cfg(test)]
mod tests {
    use super::ClientRun;

    fn run(lines: &[&str]) -> ClientRun {
        let mut text = lines.join("\n");
        text.push_str("\n{\"summary\":{\"sessions\":1}}\n");
        ClientRun::parse(&text, true).unwrap()
    }

    #[test]
    fn misrouted_names_sessions_answered_by_another_node_than_their_cid() {
        let right = r#"{"session":0,"ok":3,"nodes":["2"],"server_cid":"02a1a2a3a4a5"}"#;
        let wrong = r#"{"session":1,"ok":3,"nodes":["1"],"server_cid":"02a1a2a3a4a5"}"#;
        let split = r#"{"session":2,"ok":3,"nodes":["1","2"],"server_cid":"01a1a2a3a4a5"}"#;
        let no_cid = r#"{"session":3,"ok":3,"nodes":["3"],"server_cid":null}"#;
        let silent = r#"{"session":4,"ok":0,"nodes":[],"server_cid":null}"#;
        assert!(run(&[right, no_cid, silent]).misrouted().is_empty());
        let bad = run(&[right, wrong, split]).misrouted();
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].contains("session 1") && bad[0].contains("names node 2"));
        assert!(bad[1].contains("session 2"));
    }

    #[test]
    fn a_report_without_summary_is_an_error() {
        assert!(ClientRun::parse("{\"session\":0}\n", true).is_err());
    }
}

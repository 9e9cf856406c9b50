#!/usr/bin/env python3
"""Records the real DTLS 1.2 test peer's datagrams once, for `cargo xtask fuzz`'s corpus.

Run as root from the workspace root after `cargo build -p lb-testpeer`:
    python3 lb-fuzz/corpus/capture.py > lb-fuzz/corpus/dtls12.txt
It makes a network namespace of its own, starts `cidlb-testpeer server` (node id 1, 6-byte CIDs)
on its loopback, runs CID sessions (one rebinding its source port) and a non-CID session
against it, and prints every UDP payload seen by an AF_PACKET socket on that loopback, one per
line: `c2s HEX` (client to server) or `s2c HEX`. Then it deletes the namespace.
"""
import ctypes, os, socket, struct, subprocess, sys, time

NS = f"cidlbcap{os.getpid()}"
PEER = os.path.abspath("target/debug/cidlb-testpeer")
PORT = 5684

subprocess.run(["ip", "netns", "add", NS], check=True)
try:
    subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True)
    fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        sys.exit(f"setns {NS}: errno {ctypes.get_errno()}")
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind(("lo", 0))
    s.settimeout(0.2)
    server = subprocess.Popen([PEER, "server", "--listen", f"127.0.0.1:{PORT}", "--node-id", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    runs = [["--sessions", "2", "--messages", "4", "--rebind-every", "2", "--parallel", "1"],
            ["--sessions", "1", "--messages", "2", "--no-cid"]]
    clients = [subprocess.Popen([PEER, "client", "--server", f"127.0.0.1:{PORT}", *r],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in runs]
    seen = []
    deadline = time.time() + 20
    while time.time() < deadline and any(c.poll() is None for c in clients):
        try:
            data, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING:  # loopback shows each datagram twice
            continue
        # Ethernet (14) + IPv4 (IHL) + UDP (8).
        if len(data) < 14 or data[12:14] != b"\x08\x00" or data[23] != 17:
            continue
        ihl = (data[14] & 0x0f) * 4
        sport, dport = struct.unpack("!HH", data[14 + ihl:14 + ihl + 4])
        payload = data[14 + ihl + 8:]
        seen.append(("s2c" if sport == PORT else "c2s", payload.hex()))
    server.terminate()
    ok = all(c.wait() == 0 for c in clients)
    if not ok:
        sys.exit("a test peer client failed: no corpus written")
    print(f"# {len(seen)} DTLS 1.2 datagrams of cidlb-testpeer (Mbed TLS 3.6.5) on loopback: "
          "2 CID sessions (node id 1, 6-byte CID, rebinding), 1 non-CID session; made by capture.py")
    for d, h in seen:
        print(d, h)
finally:
    subprocess.run(["ip", "netns", "del", NS])

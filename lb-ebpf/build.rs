//! Link flags for the eBPF binaries.
//!
//! bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by default. That keeps copies as
//! ordered load/store pairs, but it also zeroes LLVM's store budget for `memset`, for which the
//! BPF backend has no expander of its own: every struct literal with a padding array and every
//! zeroed struct became a BPF-to-BPF call into a byte-at-a-time `memset` loop, and MAC copies
//! calls into `memmove` (19 call sites in the datapath, several on every packet). Without the
//! flag LLVM inlines them as plain stores.

fn main() {
    println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
}

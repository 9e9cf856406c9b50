//! XDP verdicts by number, as the kernel's `enum xdp_action` (include/uapi/linux/bpf.h) has
//! them and BPF_PROG_TEST_RUN returns them: for the agent's `cidlb explain`, the fixtures, the
//! reference and the bench. The datapath itself uses aya-ebpf's bindings of the same enum.

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The verdict's name (`XDP_DROP`), or `None` for a number the kernel does not define.
pub const fn name(action: u32) -> Option<&'static str> {
    match action {
        XDP_ABORTED => Some("XDP_ABORTED"),
        XDP_DROP => Some("XDP_DROP"),
        XDP_PASS => Some("XDP_PASS"),
        XDP_TX => Some("XDP_TX"),
        XDP_REDIRECT => Some("XDP_REDIRECT"),
        _ => None,
    }
}

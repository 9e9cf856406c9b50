//! Which interface a pinned XDP bpf_link is attached to, read from the kernel: the link pin
//! is opened with BPF_OBJ_GET and asked BPF_OBJ_GET_INFO_BY_FD (aya 0.14's `LinkInfo` has no
//! XDP ifindex). A pin file alone proves nothing: when its device is deleted the kernel detaches
//! the link (its ifindex reads 0) and the pin stays; a device recreated under the same name (a
//! VLAN or a bond brought down and up by a network manager) has another ifindex.

use std::{ffi::CString, io, os::fd::FromRawFd as _, path::Path};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `enum bpf_link_type`: BPF_LINK_TYPE_XDP.
const BPF_LINK_TYPE_XDP: u32 = 6;

/// `union bpf_attr`, large enough for the two commands used (the kernel requires the unused
/// tail to be zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zeroed, 8-aligned attribute block of the size given; the pointers
    // inside it point at buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The ifindex the XDP link pinned at `pin` is attached to (0: detached, its device gone).
pub fn xdp_ifindex(pin: &Path) -> io::Result<u32> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr([0; 128]);
    // attr.pathname (u64) at 0; bpf_fd, file_flags stay 0.
    attr.0[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we now own (closed on drop).
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose `xdp`
    // member is { u32 ifindex } at offset 16.
    let mut info = [0u64; 16];
    let mut attr = Attr([0; 128]);
    use std::os::fd::AsRawFd as _;
    attr.0[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let word = |off: usize| u32::from_ne_bytes(bytes[off..off + 4].try_into().expect("4 bytes"));
    if word(0) != BPF_LINK_TYPE_XDP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is a bpf_link of type {}, not XDP",
                pin.display(),
                word(0)
            ),
        ));
    }
    Ok(word(16))
}

/// The ifindex of interface `name` in this process's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Is the XDP link pinned at `pin` attached to interface `name` (as it is now)? `Err` says
/// why not.
pub fn check(pin: &Path, name: &str) -> Result<(), String> {
    let want = ifindex(name).ok_or_else(|| format!("no interface {name}"))?;
    match xdp_ifindex(pin) {
        Ok(i) if i == want => Ok(()),
        Ok(0) => Err(format!(
            "the link pinned at {} is detached (its device was deleted)",
            pin.display()
        )),
        Ok(i) => Err(format!(
            "the link pinned at {} is attached to ifindex {i}, not to {name} (ifindex {want}): \
             the device was recreated",
            pin.display()
        )),
        Err(e) => Err(format!("{}: {e}", pin.display())),
    }
}

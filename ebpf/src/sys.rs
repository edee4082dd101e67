//! The BPF system calls the probes need. All `unsafe` of this crate is here.

/// Checks that this process may use BPF, by creating (and closing) a one-entry array map.
/// Returns why not when it may not.
pub fn probe_bpf() -> Result<(), String> {
    // bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries (u32 each), the
    // rest zero. 128 bytes covers every field the kernel reads for this command.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: bpf(BPF_MAP_CREATE = 0) reads `size_of_val(&attr)` bytes from a valid buffer we own.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) => "BPF not permitted (needs CAP_BPF or root)".into(),
            Some(libc::ENOSYS) => "this kernel has no BPF system call".into(),
            _ => format!("BPF map creation failed: {e}"),
        });
    }
    // SAFETY: `fd` is the map descriptor just created and owned by us.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bpf_probe_matches_privilege() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        match super::probe_bpf() {
            Ok(()) => assert!(root || std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").is_ok_and(|v| v.trim() == "0")),
            Err(e) => assert!(!root, "root was refused BPF: {e}"),
        }
    }
}

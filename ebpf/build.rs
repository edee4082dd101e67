//! Compiles the BPF programs in `src/bpf/` into libbpf skeletons (`$OUT_DIR/NAME.skel.rs`: the
//! probes, `tcpstats`, and the initial-window sockops program, `initwin`).
//! Their CO-RE relocations need the kernel's types: `vmlinux.h` is generated from this machine's
//! BTF (`/sys/kernel/btf/vmlinux`) by bpftool. Where that cannot be done (no bpftool, no BTF, no
//! clang), the crate builds without the programs and the probes report why at run time; dwcp
//! then polls TCP_INFO instead.

use std::path::PathBuf;
use std::process::Command;

const PROGS: [&str; 2] = ["tcpstats", "initwin"];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(dwcp_no_bpf)");
    for p in PROGS {
        println!("cargo:rerun-if-changed=src/bpf/{p}.bpf.c");
        println!("cargo:rerun-if-changed=src/bpf/{p}.h");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    if let Err(why) = build(&out) {
        println!("cargo:warning=eBPF probes not built ({why}); dwcp will poll TCP_INFO instead");
        println!("cargo:rustc-cfg=dwcp_no_bpf");
        println!("cargo:rustc-env=DWCP_NO_BPF_WHY={why}");
    }
}

fn build(out: &std::path::Path) -> Result<(), String> {
    let btf = "/sys/kernel/btf/vmlinux";
    if !std::path::Path::new(btf).exists() {
        return Err(format!("{btf} is missing: the kernel has no BTF"));
    }
    let dump = Command::new("bpftool").args(["btf", "dump", "file", btf, "format", "c"]).output().map_err(|e| format!("bpftool: {e} (Debian package bpftool)"))?;
    if !dump.status.success() {
        return Err(format!("bpftool btf dump failed: {}", String::from_utf8_lossy(&dump.stderr).trim()));
    }
    std::fs::write(out.join("vmlinux.h"), &dump.stdout).map_err(|e| format!("writing vmlinux.h: {e}"))?;
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86",
        Ok("aarch64") => "arm64",
        Ok(other) => return Err(format!("no BPF target arch for {other}")),
        Err(_) => "x86",
    };
    for p in PROGS {
        let src = format!("src/bpf/{p}.bpf.c");
        libbpf_cargo::SkeletonBuilder::new()
            .source(&src)
            .clang_args([format!("-I{}", out.display()), "-Isrc/bpf".into(), format!("-D__TARGET_ARCH_{arch}"), "-O2".into(), "-g".into()])
            .build_and_generate(out.join(format!("{p}.skel.rs")))
            .map_err(|e| format!("compiling {src}: {e:#}"))?;
    }
    Ok(())
}

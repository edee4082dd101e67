//! Compiles the BPF programs in `src/bpf/` into libbpf skeletons (`$OUT_DIR/NAME.skel.rs`: the
//! probes, `tcpstats`, and the initial-window sockops program, `initwin`).
//! The kernel types they read come from the committed `src/bpf/vmlinux.h` (a minimal one: its
//! fields are CO-RE relocated against the running kernel's BTF at load time), so the build needs
//! clang but neither bpftool nor the build host's BTF. A build that cannot compile them fails,
//! saying why: dwcp without its probes is a different program, and it must not become one
//! silently. `DWCP_NO_BPF=1` builds without them on purpose; dwcp then says at start that it
//! polls TCP_INFO instead, and why.

use std::path::PathBuf;

const PROGS: [&str; 3] = ["tcpstats", "initwin", "ratecc"];

fn main() {
    println!("cargo:rustc-check-cfg=cfg(dwcp_no_bpf)");
    println!("cargo:rerun-if-env-changed=DWCP_NO_BPF");
    println!("cargo:rerun-if-changed=src/bpf/vmlinux.h");
    for p in PROGS {
        println!("cargo:rerun-if-changed=src/bpf/{p}.bpf.c");
        // Only a header that exists: cargo takes a missing path as changed, on every build.
        let h = format!("src/bpf/{p}.h");
        if std::path::Path::new(&h).exists() {
            println!("cargo:rerun-if-changed={h}");
        }
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    if std::env::var_os("DWCP_NO_BPF").is_some_and(|v| v != "0" && !v.is_empty()) {
        let why = "built with DWCP_NO_BPF set";
        println!("cargo:warning=eBPF probes not built ({why}); dwcp will poll TCP_INFO instead");
        println!("cargo:rustc-cfg=dwcp_no_bpf");
        println!("cargo:rustc-env=DWCP_NO_BPF_WHY={why}");
        return;
    }
    if let Err(why) = build(&out) {
        eprintln!("error: dwcp's eBPF programs did not compile: {why}");
        eprintln!("  install clang (Debian: apt-get install clang libelf-dev zlib1g-dev, or `make deps`),");
        eprintln!("  or build without the probes on purpose with DWCP_NO_BPF=1 (dwcp then polls TCP_INFO)");
        std::process::exit(1);
    }
}

fn build(out: &std::path::Path) -> Result<(), String> {
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
            .clang_args(["-Isrc/bpf".to_string(), format!("-D__TARGET_ARCH_{arch}"), "-O2".into(), "-g".into()])
            .build_and_generate(out.join(format!("{p}.skel.rs")))
            .map_err(|e| format!("compiling {src}: {e:#}"))?;
    }
    Ok(())
}

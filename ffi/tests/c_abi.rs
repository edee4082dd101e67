//! Compiles `tests/c/test_dwcp.c` with the system's `cc` against the committed header and the
//! built `libdwcp.so`, and runs it: a loopback transfer, a wrong key and a cancel, all through
//! the C ABI.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The directory holding the built `libdwcp.so` (beside the test binary's `deps/`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for d in [deps.parent().unwrap(), deps] {
        if d.join("libdwcp.so").exists() {
            return d.to_owned();
        }
    }
    panic!("libdwcp.so not found beside {}", deps.display());
}

#[test]
fn a_c_program_sends_receives_meets_a_wrong_key_and_cancels() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    let (key, other, out) = (tmp.path().join("key"), tmp.path().join("other"), tmp.path().join("out"));
    dataplane::crypto::Psk::generate().save(&key).unwrap();
    dataplane::crypto::Psk::generate().save(&other).unwrap();
    let exe = tmp.path().join("test_dwcp");
    let lib = lib_dir();
    let cc = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-D_DEFAULT_SOURCE", "-I"])
        .arg(Path::new(dir).join("include"))
        .arg(Path::new(dir).join("tests/c/test_dwcp.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-ldwcp", "-o"])
        .arg(&exe)
        .output()
        .expect("the system's cc");
    assert!(cc.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&cc.stderr));
    let run = Command::new(&exe).arg(&key).arg(&other).arg(&out).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    eprintln!("{text}");
    assert!(run.status.success() && text.contains("\nok\n"), "{text}");
    assert!(out.join("c.img").exists(), "the C receiver published the C sender's object");
    assert!(!out.join("cancelled.img").exists(), "a cancelled transfer publishes nothing");
}

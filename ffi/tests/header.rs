//! The committed header is what cbindgen makes of the source now.

#[test]
fn the_committed_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let cfg = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut made = Vec::new();
    cbindgen::Builder::new().with_crate(dir).with_config(cfg).generate().expect("cbindgen").write(&mut made);
    let path = std::path::Path::new(dir).join("include/dwcp.h");
    if std::env::var_os("DWCP_BLESS").is_some() {
        std::fs::write(&path, &made).expect("write the header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(committed == made, "ffi/include/dwcp.h is stale: regenerate it with DWCP_BLESS=1 cargo test -p ffi --test header, and commit it");
}

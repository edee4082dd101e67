//! C ABI for dwcp (not built yet). It will expose a thin, stable C interface over the data
//! plane's send and receive sessions (open, progress, result) with a generated header, so a
//! hypervisor's C code can drive transfers without linking Rust directly.

//! Tuning sweeps (not built yet). It will run the `make bench-*` benchmarks over parameter grids
//! (streams, chunk size, window, compression level) and turn their JSON lines into reports, so
//! defaults are chosen from measurements on the target hardware.
#![forbid(unsafe_code)]

# dwcp: the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
# Debian packages, installed when missing by the targets that need them (as root; otherwise the
# apt-get line to run is printed). The soft-RoCE rig and the rdma-sys build need the second set.
BUILD_PKGS := pkg-config libhwloc-dev libudev-dev libibverbs-dev librdmacm-dev libclang-dev clang \
              bpftool libelf-dev zlib1g-dev make fonts-dejavu-core
BENCH_PKGS := iperf3 zstd xdelta3
RIG_PKGS := qemu-system-x86 busybox-static rdma-core ibverbs-utils perftest libibverbs-dev \
            librdmacm-dev libclang-dev clang pkg-config cpio kmod iproute2 gzip \
            iputils-ping ethtool iperf3 python3 openssl xdelta3

.PHONY: package package-test bench-micro report tune all deps bench-deps vm-deps build demo test libdwcp fuzz fuzz-seeds fuzz-smoke bench-base bench-transport bench-boot bench-hde bench-rdma bench-migrate bench-wan bench-pba bench-fleet bench-warm bench-ass bench-probes corpus clean

all: build

define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing; run: sudo apt-get install$$missing" >&2; exit 1; fi; \
	fi
endef

# rust-toolchain.toml pins the toolchain; rustup installs it when missing (about 10 s: the
# minimal profile with rustfmt and clippy). Where rustup cannot fetch it but its stable is that
# very version, stable is linked under the pinned name (rustup refuses such names for
# `toolchain link`, so the link is made in its toolchains directory).
TOOLCHAIN := $(shell sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
deps:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
	@if command -v rustup >/dev/null && ! rustup toolchain list | grep -q "^$(TOOLCHAIN)-"; then \
	  rustup toolchain install $(TOOLCHAIN) --profile minimal --component rustfmt,clippy || { \
	    host=$$(RUSTUP_TOOLCHAIN=stable rustc -vV | sed -n 's/^host: //p'); \
	    if RUSTUP_TOOLCHAIN=stable rustc --version | grep -q "^rustc $(TOOLCHAIN) "; then \
	      echo "rustup could not fetch $(TOOLCHAIN); its stable is that very version: using it under the pinned name"; \
	      ln -sfn "$$(RUSTUP_TOOLCHAIN=stable rustc --print sysroot)" "$${RUSTUP_HOME:-$$HOME/.rustup}/toolchains/$(TOOLCHAIN)-$$host"; \
	    else echo "cannot install toolchain $(TOOLCHAIN) (rust-toolchain.toml)" >&2; exit 1; fi; }; fi
	$(call apt_install,$(BUILD_PKGS))

bench-deps: deps
	$(call apt_install,$(BENCH_PKGS))

vm-deps: deps
	$(call apt_install,$(RIG_PKGS))

# The default members: everything but the rigs, so the demo needs no RDMA or QEMU packages.
build: deps
	$(CARGO) build --release

# Receiver and sender on loopback: a 2 GiB generated VM-like image over encrypted streams (the
# probe finds a datacenter path; the receiver requires encryption, so the sender keeps it),
# written to target/demo/out, verified end to end, then a summary.
demo: build
	@mkdir -p target/demo && rm -rf target/demo/out
	@./target/release/dwcp keygen --force target/demo/key 2>/dev/null
	@./target/release/dwcp recv --listen 127.0.0.1:7470 --out target/demo/out --key-file target/demo/key --once & \
	rx=$$!; sleep 0.5; \
	./target/release/dwcp send gen:2GiB --name vm-image.raw --to 127.0.0.1:7470 --key-file target/demo/key; st=$$?; \
	wait $$rx; rst=$$?; \
	ls -l target/demo/out; \
	exit $$(( st | rst ))

# The fuzz smoke run goes first so that cargo test's summary closes the output; the rigs need
# root (CI has it) and the packages of vm-deps, and run one test at a time, printing the figures
# they measure; last, the .deb is built and installed into a fresh Debian root.
test: vm-deps
	@t=$$(date +%s); $(MAKE) --no-print-directory fuzz-smoke; rc=$$?; echo "== stage fuzz-smoke: $$(( $$(date +%s) - t )) s"; exit $$rc
	@t=$$(date +%s); $(CARGO) test --release --workspace --exclude hw-tests; rc=$$?; echo "== stage unit+integration: $$(( $$(date +%s) - t )) s"; exit $$rc
	@t=$$(date +%s); $(CARGO) test --release -p hw-tests -- --nocapture --test-threads=1; rc=$$?; echo "== stage rigs: $$(( $$(date +%s) - t )) s"; exit $$rc
	@t=$$(date +%s); $(MAKE) --no-print-directory package-test; rc=$$?; echo "== stage package: $$(( $$(date +%s) - t )) s"; exit $$rc

# A short run of every fuzz target (FUZZ_SMOKE_SECS each, over the committed seeds in
# dataplane/fuzz/seeds): installs cargo-fuzz from crates.io when missing; RUSTC_BOOTSTRAP lets the
# stable toolchain take its sanitizer flags.
FUZZ_SMOKE_SECS ?= 5
fuzz-smoke:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	dataplane/fuzz/run.sh $(FUZZ_SMOKE_SECS)

# The fuzz campaign: every target until 10 million executions or FUZZ_SECS seconds; the table of
# executions goes to docs/fuzz-campaign.md (see docs/security.md). It runs without a sanitizer
# (FUZZ_SANITIZER): the decoders are safe Rust, and AddressSanitizer's allocator made them 3 to
# 35 times slower; the smoke run in make test keeps it.
FUZZ_SECS ?= 1800
FUZZ_SANITIZER ?= none
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	SANITIZER=$(FUZZ_SANITIZER) dataplane/fuzz/run.sh $(FUZZ_SECS) 10000000 $(CURDIR)/docs/fuzz-campaign.md

# Rewrites the committed seed corpus from the encoders (valid frames, journals, HDE frames, a
# QEMU migration's start and its encoding).
fuzz-seeds:
	DWCP_FUZZ_SEEDS=$(CURDIR)/dataplane/fuzz/seeds $(CARGO) test --release -p dataplane --lib write_fuzz_seeds -- --ignored

# BASE=REV also runs the plaintext 8-stream cases with REV's dwcp (built once, under
# target/bench-base/REV), in the same run.
bench-transport: build bench-deps
	$(if $(BASE),$(MAKE) --no-print-directory bench-base BASE=$(BASE) &&) \
	$(if $(BASE),BENCH_BASE=$(CURDIR)/target/bench-base/$(BASE)/release/dwcp) ./target/release/bench-transport

# Microbenchmarks of the hot paths (criterion: frame header, XXH3, BLAKE3, AES-GCM, HDE per page
# kind, reorder buffer); the table and target/bench/micro.json from criterion's estimates.
bench-micro: build
	$(CARGO) bench -p benches --bench micro -- --warm-up-time 1 --measurement-time 3
	./target/release/dwcp report --micro-json

# One page of every bench's JSON (target/bench), the microbenchmarks and the last sweep, with
# plots: target/report/report.md.
report: build
	./target/release/dwcp report

# A tuning sweep with the default knobs (TUNE_FLAGS for more: --knob, --grid, --budget): on
# loopback, or over the WAN emulator with WAN's link flags (make tune WAN="--rtt 50ms --rate
# 200mbit --loss 0.1%"; root).
tune: build
	$(if $(WAN),$(CARGO) build --release -q -p hw-tests --bin dwcp-wan && tuning/tune-wan.sh "$(WAN)" $(TUNE_FLAGS),./target/release/dwcp tune $(TUNE_FLAGS))

bench-base:
	@d=$(CURDIR)/target/bench-base/src-$(BASE); [ -d $$d ] || git worktree add -f --detach $$d $(BASE); \
	CARGO_TARGET_DIR=$(CURDIR)/target/bench-base/$(BASE) $(CARGO) build --release -p dwcp --manifest-path $$d/Cargo.toml

bench-boot: build
	./target/release/bench-boot

# HDE against zstd and xdelta3 on the guest-RAM corpus (made first if missing), one core each.
bench-hde: build bench-deps corpus
	./target/release/bench-hde

# dwcp's RDMA transport against perftest (ib_write_bw, ib_send_lat) in the soft-RoCE guest.
bench-rdma: build vm-deps
	./target/release/bench-rdma

# Live migration over the WAN rig: QEMU's own (plain, xbzrle, multifd+zstd) against dwcp tunnel and page-aware modes.
bench-migrate: build vm-deps
	$(CARGO) build --release -q -p hw-tests --bin dwcp-wan
	./target/release/bench-migrate

# WAN utilization over the rig (1 Gbit/s 50 ms 0.1%; 200 Mbit/s 150 ms 1%), alone and against a
# competing flow: dwcp with ACP (delay, bbr-model), without, on kernel BBR; iperf3 cubic and bbr.
bench-wan: build bench-deps
	$(CARGO) build --release -q -p hw-tests --bin dwcp-wan
	./target/release/bench-wan

# Jobs sharing one link through the daemon (WAN rig, about 5 minutes): ITP against
# first-come-first-served and fair sharing, same run.
bench-fleet: build bench-deps
	$(CARGO) build --release -q -p hw-tests --bin dwcp-wan
	./target/release/bench-fleet

# Warm peers: a job on the daemon's warm streams against a cold dwcp send, 16 MiB and 256 MiB, at
# 150 ms / 1% and 50 ms / 0.1% on the WAN rig (1 Gbit/s).
bench-warm: build bench-deps
	$(CARGO) build --release -q -p hw-tests --bin dwcp-wan
	./target/release/bench-warm

# ASS: the fleet's Raft group (3 daemons) and gossip (5) on the WAN rig's mesh, one namespace per
# daemon: handoff commit time, failover, gossip convergence and staleness, idle cost per node.
bench-ass: build
	$(CARGO) build --release -q -p hw-tests --bin dwcp-wan
	./target/release/bench-ass

# PBA's predictors, fitted on recorded traces and scored on held-out ones (RECORD=1 records the
# traces anew over the WAN rig with changing cross traffic).
bench-pba: build
	$(if $(RECORD),$(MAKE) --no-print-directory bench-deps && $(CARGO) build --release -q -p hw-tests --bin dwcp-wan &&) ./target/release/bench-pba $(if $(RECORD),--record)

# What the eBPF probes cost: ns per event and CPU share on a full-speed loopback transfer.
bench-probes: build
	./target/release/bench-probes

# Guest-RAM corpus under target/corpus (cached): see docs/rigs.md.
corpus: vm-deps
	$(CARGO) build --release -q -p hw-tests
	hw-tests/corpus

clean:
	$(CARGO) clean

# libdwcp: the C library (libdwcp.so, libdwcp.a), its committed header and a pkg-config file in
# target/libdwcp/ (PREFIX for the .pc file's paths; copy the three into PREFIX/lib, PREFIX/include
# and PREFIX/lib/pkgconfig). The C example builds against it.
PREFIX ?= /usr/local
# The .deb (target/debian/): cargo-deb, installed from crates.io when missing; man pages and
# completions generated by the binary into target/package first.
package: build
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	rm -rf target/package/man target/package/completions
	./target/release/dwcp generate --out target/package
	$(CARGO) deb -p dwcp --no-build --strip

# Installs the .deb into a fresh Debian 12 root and checks it (packaging/test-package.sh; root).
package-test: package
	$(call apt_install,debootstrap systemd)
	packaging/test-package.sh $$(ls -t target/debian/dwcp_*.deb | head -1)

libdwcp:
	$(CARGO) build --release -p ffi
	@mkdir -p target/libdwcp
	cp target/release/libdwcp.so target/release/libdwcp.a ffi/include/dwcp.h target/libdwcp/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e "s|@VERSION@|$$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)|" ffi/dwcp.pc.in > target/libdwcp/dwcp.pc
	cc -std=c11 -Wall -Wextra -Werror -D_DEFAULT_SOURCE -I ffi/include ffi/examples/send.c -L target/libdwcp -Wl,-rpath,$(CURDIR)/target/libdwcp -ldwcp -o target/libdwcp/send-example
	@echo "libdwcp in target/libdwcp: libdwcp.so, libdwcp.a, dwcp.h, dwcp.pc, send-example"

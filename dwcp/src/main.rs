//! `dwcp`: move VM images and byte streams between hosts over many authenticated, encrypted
//! io_uring TCP streams, verified end to end.

mod daemon;
mod fmt;
mod live;
mod migrate;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use dataplane::control::acp::AcpKind;
use dataplane::crypto::Psk;
use dataplane::recv::{self, RecvOptions, Sink};
use dataplane::send::{self, KillStream, Progress, SendOptions, ZeroCopy};
use dataplane::source::Source;

#[derive(Parser, Debug)]
#[command(name = "dwcp", version, about = "Move VM images and byte streams between hosts at line rate, verified end to end")]
struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Send a file, standard input (`-`) or a generated image (`gen:SIZE[:SEED]`) to a receiver.
    Send(Box<SendArgs>),
    /// Receive objects from senders, several sessions at once.
    Recv(RecvArgs),
    /// Run the daemon: boot graph, transfer listener, HTTP health/readiness/metrics/status.
    Daemon {
        /// Configuration file (TOML); DWCP_* variables and these flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Transfer listener address (overrides node.listen).
        #[arg(long)]
        listen: Option<String>,
        /// HTTP endpoint address (overrides api.listen).
        #[arg(long)]
        api: Option<String>,
    },
    /// Live-migrate a QEMU VM through dwcp: drives the source QEMU over QMP (its `migrate` runs
    /// `dwcp send -`), reports rounds, dirty rate, downtime. The destination QEMU runs with
    /// `-incoming "exec:dwcp recv --listen ADDR --out - --once --key-file K"`.
    Migrate {
        /// The source QEMU's QMP socket (`-qmp unix:PATH,server,nowait`).
        #[arg(long)]
        qmp: PathBuf,
        /// The destination's dwcp receiver, HOST:PORT.
        #[arg(long)]
        to: String,
        /// Pre-shared key file.
        #[arg(long, env = "DWCP_KEY_FILE")]
        key_file: PathBuf,
        /// Stream name at the receiver.
        #[arg(long, default_value = "vmstate")]
        name: String,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// `pages`: page-aware (RAM pages delta-encoded across rounds, the rest carried as it
        /// is; falls back to tunnel mode on a stream it cannot parse), or `tunnel`: the stream
        /// as QEMU writes it.
        #[arg(long, default_value = "pages", value_parser = ["pages", "tunnel"])]
        mode: String,
        /// Further `dwcp send` flags for the stream (e.g. `--streams 8`), after `--`.
        #[arg(last = true)]
        send_flags: Vec<String>,
    },
    /// Show a running daemon's status for a person.
    Status {
        /// The daemon's HTTP endpoint.
        #[arg(long, default_value = "127.0.0.1:7471")]
        api: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Write a new random pre-shared key to FILE (mode 0600); copy it to both hosts.
    Keygen {
        /// Where to write the key.
        file: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCmd {
    /// Load and validate FILE (with DWCP_* overrides); names the key, line and expectation of any error.
    Check {
        /// The file.
        file: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct SendArgs {
    /// A file path, `-` for standard input, or `gen:SIZE[:SEED]` for a generated VM-like image.
    src: String,
    /// Receiver address, HOST:PORT.
    #[arg(long)]
    to: String,
    /// Parallel TCP streams (default: chosen from cores and measured RTT, and printed).
    #[arg(long)]
    streams: Option<u16>,
    /// Pre-shared key file (from `dwcp keygen`).
    #[arg(long, env = "DWCP_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Path mode: `auto` probes the receiver (RTT, delivery rate) and picks datacenter or
    /// internet defaults, then switches live as the transfer's own measurements change;
    /// `datacenter` or `internet` force one.
    #[arg(long, default_value = "auto", value_parser = ["auto", "datacenter", "internet"])]
    mode: String,
    /// Configuration file whose [mode] thresholds `--mode auto` uses (the daemon's file will do).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Send in plaintext (peers are still authenticated); for trusted datacenter links.
    #[arg(long, conflicts_with = "encrypt")]
    no_encrypt: bool,
    /// Encrypt even where the mode would not (datacenter mode sends plaintext when the receiver allows it).
    #[arg(long)]
    encrypt: bool,
    /// Transport: `auto` (RDMA in datacenter mode when this host has an RDMA device and the
    /// receiver grants it, else TCP), `tcp`, or `rdma` (plaintext; falls back to TCP with the
    /// reason shown when it cannot be used).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcp", "rdma"])]
    transport: String,
    /// RDMA device (default: the first).
    #[arg(long)]
    rdma_device: Option<String>,
    /// RDMA queue pairs (default: one per shard core).
    #[arg(long, default_value_t = 0)]
    rdma_qps: u16,
    /// RDMA completions: `busy` polling (lowest latency) or `event` (sleeps on the completion channel).
    #[arg(long, default_value = "busy", value_parser = ["busy", "event"])]
    rdma_poll: String,
    /// Fault injection for tests: wrong-rkey or past-region.
    #[arg(long, hide = true)]
    fault_rdma: Option<String>,
    /// HDE page encoding of memory images (zero and duplicate pages elided, deltas, zstd):
    /// `auto` turns it on for whole-page images in internet mode, where compression pays.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    hde: String,
    /// Send a later round of the same image: PREV is the round the receiver already holds under
    /// the same name; only pages that differ travel, as deltas against PREV (implies --hde on).
    #[arg(long)]
    round_of: Option<PathBuf>,
    /// Send a later round from a dirty log: FILE is a bitmap, one bit per unit of the image
    /// (least significant bit of each byte first), set where the image changed since the round
    /// the receiver holds under the same name. Only those units travel: against --round-of PREV
    /// when it is given, else whole (the previous round need only be at the receiver). The
    /// receiver checks the whole image at commit, so a log that missed a change fails the round
    /// unpublished. Implies --hde on.
    #[arg(long, value_name = "FILE")]
    dirty: Option<PathBuf>,
    /// The unit of --dirty's bitmap: 4KiB (pages), 2MiB (huge pages), 64KiB (QEMU's disk dirty
    /// bitmaps' default), or any whole number of 4 KiB pages.
    #[arg(long, default_value = "4KiB", requires = "dirty")]
    dirty_unit: String,
    /// HDE effort: `auto` (the zstd level, or none, that finishes soonest on the measured link),
    /// `off` (zero, duplicate and XBZRLE pages only), or a zstd level 1-19.
    #[arg(long, default_value = "auto")]
    compress: String,
    /// The stream on stdin is QEMU's migration stream (`migrate "exec:dwcp send - --qemu ..."`):
    /// send it page-aware, its RAM pages delta-encoded across rounds (HDE) and the rest carried
    /// as it is; the receiver (`--out -`) rebuilds QEMU's exact bytes. A stream it cannot parse
    /// falls back to tunnel mode, with the reason in the summary.
    #[arg(long)]
    qemu: bool,
    /// Page-aware mode: bytes of old pages kept for deltas (as QEMU's XBZRLE cache).
    #[arg(long, default_value = "256MiB")]
    hde_cache: String,
    /// Adaptive congestion prevention over TCP: `auto` (`delay` in internet mode, off in
    /// datacenter mode), `delay` (pace to keep the RTT within 1.25x of its minimum), `bbr-model`
    /// (pace by a model of BBR's probing), or `off` (the streams' congestion control alone).
    #[arg(long, default_value = "auto", value_parser = ["auto", "off", "delay", "bbr-model"])]
    acp: String,
    /// Congestion control of every stream (`bbr`, `cubic`, ...; default: `bbr` under ACP, the
    /// system's otherwise).
    #[arg(long)]
    cc: Option<String>,
    /// Where per-stream path state comes from: `auto` (the eBPF probes, or TCP_INFO polling
    /// when BPF is refused) or `poll` (TCP_INFO only).
    #[arg(long, default_value = "auto", value_parser = ["auto", "poll"])]
    monitor: String,
    /// The streams' first congestion window: `auto` (64 KiB, the most a receiver's first window
    /// takes, under ACP; the kernel's ten segments without it), `off` (the kernel's), or a size.
    /// Set by an eBPF sockops program on this process's cgroup; without BPF permission the
    /// streams keep the kernel's, and the summary says why.
    #[arg(long, default_value = "auto")]
    initial_window: String,
    /// Write each control interval (goodput, srtt, retransmits, pace, PBA's prediction) to FILE
    /// as CSV.
    #[arg(long)]
    trace_out: Option<PathBuf>,
    /// Send only what the receiver does not already hold from an earlier, interrupted transfer.
    #[arg(long)]
    resume: bool,
    /// Chunk size (e.g. 1MiB). Default: 1 MiB, cut by PBA for an object too small to give every
    /// active stream four chunks on a path where it takes few round trips (not with --resume).
    #[arg(long, value_parser = fmt::parse_size)]
    chunk_size: Option<u64>,
    /// Unacknowledged chunks allowed per stream (default 32). It must cover the socket buffers
    /// on both ends plus the bandwidth-delay product, or the stream idles waiting for
    /// acknowledgements. With --qemu the default is sized from the probe instead: QEMU paces its
    /// rounds by how fast its stream drains, so dwcp holds about two bandwidth-delay products.
    #[arg(long)]
    window: Option<usize>,
    /// Chunks read from standard input ahead of the streams' windows (default: streams x
    /// window; 1 with --qemu). A live producer paces itself by how fast its pipe drains: what
    /// dwcp reads ahead is still queued when QEMU stops the VM, and adds to its downtime.
    #[arg(long)]
    read_ahead: Option<usize>,
    /// Bytes each stream may queue in the kernel not yet sent (TCP_NOTSENT_LOWAT, e.g. 32KiB;
    /// default: unbounded, 32KiB with --qemu). A live producer then sees how fast the link
    /// drains, and less of its stream is still queued when it stops.
    #[arg(long, value_parser = fmt::parse_size)]
    notsent_lowat: Option<u64>,
    /// Zero-copy sends (IORING_OP_SEND_ZC): auto (when the kernel has it, on paths under 2 ms that are not loopback), on, off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    zerocopy: String,
    /// Declare a stream dead after this long without an acknowledgement (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = fmt::parse_duration)]
    idle_timeout: Duration,
    /// Object name at the receiver (default: the file name; `stdin` or `generated.img` otherwise).
    #[arg(long)]
    name: Option<String>,
    /// Pin shard threads to these cores (e.g. 0,2,4); default all.
    #[arg(long, value_delimiter = ',')]
    cores: Option<Vec<usize>>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Fault injection for tests: shut stream IDX's socket down after BYTES sent (IDX:BYTES).
    #[arg(long, hide = true)]
    fault_kill_stream: Option<String>,
}

#[derive(clap::Args, Debug)]
struct RecvArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, default_value = "0.0.0.0:7470")]
    listen: String,
    /// Output directory (objects land there under their names), or `-` for standard output.
    #[arg(long, required_unless_present = "discard")]
    out: Option<String>,
    /// Verify and drop what arrives (benchmarks).
    #[arg(long, conflicts_with = "out")]
    discard: bool,
    /// Pre-shared key file (from `dwcp keygen`).
    #[arg(long, env = "DWCP_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Also accept senders that use --no-encrypt.
    #[arg(long)]
    no_encrypt: bool,
    /// End a handshake or session with no progress for this long (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = fmt::parse_duration)]
    idle_timeout: Duration,
    /// Largest chunk accepted.
    #[arg(long, default_value = "2MiB", value_parser = fmt::parse_size)]
    max_chunk: u64,
    /// Exit after the first session ends (status 0 if it verified).
    #[arg(long)]
    once: bool,
    /// Pin shard threads to these cores (e.g. 1,3), one shard each; default all.
    #[arg(long, value_delimiter = ',')]
    cores: Option<Vec<usize>>,
    /// Print each session's result as a JSON line.
    #[arg(long)]
    json: bool,
    /// Grant RDMA to senders that ask (plaintext sessions, when a device opens): on or off.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    rdma: String,
    /// RDMA device (default: the first).
    #[arg(long)]
    rdma_device: Option<String>,
    /// RDMA completions: busy or event.
    #[arg(long, default_value = "busy", value_parser = ["busy", "event"])]
    rdma_poll: String,
    /// Permission bits of received objects (octal).
    #[arg(long, default_value = "600", value_parser = parse_octal_mode)]
    file_mode: u32,
    /// Keep an interrupted session's partial output this long for `send --resume`.
    #[arg(long, default_value = "24h", value_parser = fmt::parse_duration)]
    keep_partial: Duration,
    /// Refuse objects declared larger than this (e.g. 2TiB); objects are always refused when
    /// they do not fit in the free space.
    #[arg(long, value_parser = fmt::parse_size)]
    max_object_size: Option<u64>,
    /// Time a new connection has for its whole handshake.
    #[arg(long, default_value = "10s", value_parser = fmt::parse_duration)]
    handshake_timeout: Duration,
    /// Handshakes in progress at once from one address (256 in all).
    #[arg(long, default_value_t = 64)]
    max_handshakes_per_addr: usize,
}

/// `600`, `0640`: permission bits, at most 0777.
fn parse_octal_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not a file mode (octal, like 600 or 640)")),
    }
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // The daemon sets logging up in its boot graph (from [log], DWCP_LOG_*, and -v).
    if !matches!(cli.cmd, Cmd::Daemon { .. }) {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let r = match cli.cmd {
        Cmd::Send(a) => cmd_send(*a),
        Cmd::Recv(a) => cmd_recv(a),
        Cmd::Keygen { file, force } => cmd_keygen(&file, force),
        Cmd::Daemon { config, listen, api } => daemon::run(config, listen, api, (cli.verbose > 0).then_some(level)),
        Cmd::Status { api, json } => daemon::status(&api, json),
        Cmd::Migrate { qmp, to, key_file, name, json, mode, send_flags } => {
            migrate::run(&migrate::MigrateArgs { qmp, to, key_file, name, pages: mode == "pages", send_flags, json })
        }
        Cmd::Config { cmd: ConfigCmd::Check { file } } => daemon::check(&file),
    };
    if let Err(e) = r {
        // Our error types already print their causes; add only what a layer did not say.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !msg.contains(&c) {
                msg = format!("{msg}: {c}");
            }
        }
        eprintln!("dwcp: error: {msg}");
        std::process::exit(1);
    }
}

fn load_key(path: Option<&PathBuf>) -> Result<Psk> {
    let Some(p) = path else {
        bail!("no key given: pass --key-file FILE (or set DWCP_KEY_FILE); create one with `dwcp keygen FILE` and copy it to both hosts");
    };
    Ok(Psk::from_file(p)?)
}

fn cmd_keygen(file: &PathBuf, force: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(0o600);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let mut f = o.open(file).with_context(|| format!("cannot create {} (use --force to overwrite)", file.display()))?;
    writeln!(f, "{}", Psk::generate().to_hex())?;
    eprintln!("wrote a new key to {}; copy it to the other host and pass it with --key-file", file.display());
    Ok(())
}

fn parse_source(src: &str, name: Option<String>) -> Result<Source> {
    if src == "-" {
        return Ok(Source::Stdin { name: name.unwrap_or_else(|| "stdin".into()) });
    }
    if let Some(spec) = src.strip_prefix("gen:") {
        let (size, seed) = match spec.split_once(':') {
            Some((s, seed)) => (s, seed.parse::<u64>().context("the seed in gen:SIZE:SEED must be a number")?),
            None => (spec, 1),
        };
        let size = fmt::parse_size(size).map_err(anyhow::Error::msg)?;
        return Ok(Source::Generated { size, seed, name: name.unwrap_or_else(|| "generated.img".into()) });
    }
    let mut s = Source::file(std::path::Path::new(src)).with_context(|| format!("cannot read source {src}"))?;
    if let (Some(n), Source::File { name, .. }) = (name, &mut s) {
        *name = n;
    }
    Ok(s)
}

fn cmd_send(a: SendArgs) -> Result<()> {
    let psk = load_key(a.key_file.as_ref())?;
    let source = parse_source(&a.src, a.name.clone())?;
    let later_round = a.round_of.is_some() || a.dirty.is_some();
    if later_round && a.name.is_none() && !matches!(source, Source::File { .. }) {
        bail!("--round-of and --dirty send a later round of an object the receiver holds by name: pass --name");
    }
    let forced = match a.mode.as_str() {
        "datacenter" => Some(ctlplane::mode::Mode::Datacenter),
        "internet" => Some(ctlplane::mode::Mode::Internet),
        _ => None,
    };
    let encrypt = match (a.encrypt, a.no_encrypt) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let cores = dataplane::placement::shard_cores(a.cores.as_deref()).map_err(anyhow::Error::msg)?.len();
    let thresholds = match &a.config {
        Some(p) => ctlplane::config::Config::load(Some(p), std::env::vars(), &[])?.thresholds(),
        None => ctlplane::mode::Thresholds::default(),
    };
    #[cfg(feature = "rdma")]
    let rdma_here = dataplane::transport::rdma::available();
    #[cfg(not(feature = "rdma"))]
    let rdma_here = false;
    // Forcing RDMA implies plaintext (the RDMA path does not encrypt) unless --encrypt says otherwise.
    let encrypt = if a.transport == "rdma" { encrypt.or(Some(false)) } else { encrypt };
    // Stream 0 connects (encrypted, as every mode but a datacenter one with a receiver that
    // allows plaintext wants) while the probe runs: on a long path that saves the two round
    // trips of its connection and key exchange. Unused, it is closed before its Hello.
    let early0 = (encrypt != Some(false)).then(|| {
        let (to, psk, idle) = (a.to.clone(), psk.clone(), a.idle_timeout);
        std::thread::spawn(move || dataplane::handshake::connect(&to, &psk, true, 0, idle))
    });
    // PBA's stream trials, for a file or generated image (a producer on standard input, QEMU
    // among them, sets its own pace): room for them among the streams opened.
    let trials = a.streams.is_none() && !matches!(source, Source::Stdin { .. });
    let mut plan = live::plan(&a.to, &psk, thresholds, forced, a.streams, encrypt, cores, rdma_here, trials).with_context(|| format!("probing {}", a.to))?;
    let stream0 = early0.and_then(|h| h.join().ok()?.ok()).filter(|_| plan.encrypt);
    let mut opts = SendOptions::new(a.to.clone(), psk);
    opts.streams = Some(plan.opened);
    opts.chunk_size = u32::try_from(a.chunk_size.unwrap_or(1 << 20)).context("chunk size too large")?;
    opts.encrypt = plan.encrypt;
    opts.resume = a.resume;
    opts.window = a.window.unwrap_or(32);
    opts.read_ahead = a.read_ahead;
    opts.notsent_lowat = a.notsent_lowat.map(|b| u32::try_from(b).unwrap_or(u32::MAX));
    opts.zerocopy = match a.zerocopy.as_str() {
        "on" => ZeroCopy::On,
        "off" => ZeroCopy::Off,
        _ => ZeroCopy::Auto,
    };
    opts.idle_timeout = a.idle_timeout;
    opts.cores = a.cores.clone();
    #[cfg_attr(not(feature = "rdma"), allow(unused_variables))]
    let want_rdma = match a.transport.as_str() {
        "rdma" => true,
        "tcp" => false,
        _ => plan.defaults.transport == ctlplane::mode::Transport::Rdma,
    };
    #[cfg(not(feature = "rdma"))]
    if a.transport == "rdma" {
        bail!("this dwcp was built without the RDMA transport (the rdma feature, which needs libibverbs); use --transport tcp");
    }
    #[cfg(feature = "rdma")]
    if want_rdma {
        opts.rdma = Some(send::RdmaOptions {
            device: a.rdma_device.clone(),
            qps: a.rdma_qps,
            poll: if a.rdma_poll == "event" { dataplane::transport::rdma::Poll::Event } else { dataplane::transport::rdma::Poll::Busy },
            fault: match a.fault_rdma.as_deref() {
                Some("wrong-rkey") => Some(send::RdmaFault::WrongRkey),
                Some("past-region") => Some(send::RdmaFault::PastRegion),
                Some(other) => bail!("--fault-rdma takes wrong-rkey or past-region, not {other}"),
                None => None,
            },
        });
    }
    let image = matches!(&source, Source::File { size, .. } | Source::Generated { size, .. } if size % 4096 == 0 && *size > 0);
    let hde_on = match a.hde.as_str() {
        "on" => true,
        "off" => false,
        // RDMA sessions carry raw chunks (the receiver decodes HDE on its TCP path only).
        _ => later_round || (image && plan.defaults.adaptive_compression && !a.resume && a.transport != "rdma"),
    };
    if later_round && a.hde == "off" {
        bail!("--round-of and --dirty send a delta round, which is HDE: drop --hde off");
    }
    if hde_on {
        let compress = match a.compress.as_str() {
            "auto" => send::Compress::Auto,
            "off" => send::Compress::Off,
            l => send::Compress::Level(zstd_level(l)?),
        };
        let round_of = match &a.round_of {
            Some(p) => {
                let f = std::fs::File::open(p).with_context(|| format!("cannot read the previous round {}", p.display()))?;
                Some(Arc::new(dataplane::sys::map_readonly(&f).with_context(|| format!("mapping {}", p.display()))?))
            }
            None => None,
        };
        let dirty = match &a.dirty {
            Some(p) => {
                let unit = fmt::parse_size(&a.dirty_unit).map_err(anyhow::Error::msg).context("--dirty-unit")?;
                let bits = std::fs::read(p).with_context(|| format!("cannot read the dirty log {}", p.display()))?;
                let log = dataplane::hde::DirtyLog::new(bits, unit, source.size().unwrap_or(0)).map_err(anyhow::Error::msg).with_context(|| format!("--dirty {}", p.display()))?;
                Some(Arc::new(log))
            }
            None => None,
        };
        opts.hde = Some(send::HdeSend { compress, round_of, dirty, link_bps: plan.report.probe.bw_bps });
    }
    if a.qemu {
        if !matches!(source, Source::Stdin { .. }) {
            bail!("--qemu reads QEMU's migration stream from standard input: pass - as the source");
        }
        let level = match a.compress.as_str() {
            // Adaptive effort for page-aware streams is not wired: followed batch by batch on the
            // rig it swung between none, 1 and 9, and every guest and link took longer than at
            // zstd 3 (mix at 200 Mbit/s: 4.22 s against 3.17 s; docs/operations.md). zstd 3
            // serves links up to a few Gbit/s on one core.
            "auto" => Some(3),
            "off" => None,
            l => Some(zstd_level(l)?),
        };
        let cache_bytes = fmt::parse_size(&a.hde_cache).map_err(anyhow::Error::msg).context("--hde-cache")?;
        opts.qemu = Some(send::QemuPages { level, cache_bytes });
        if a.window.is_none() {
            opts.window = qemu_window(&plan.report.probe, opts.chunk_size, plan.active);
        }
        opts.read_ahead = Some(a.read_ahead.unwrap_or(1));
        opts.notsent_lowat = Some(opts.notsent_lowat.unwrap_or(NOTSENT_LOWAT));
    }
    opts.control = send::ControlOptions {
        acp: match a.acp.as_str() {
            "auto" if plan.defaults.acp => AcpKind::Delay,
            "auto" => AcpKind::Off,
            k => AcpKind::parse(k).context("--acp takes auto, off, delay or bbr-model")?,
        },
        cc: a.cc.clone(),
        monitor: if a.monitor == "poll" { ebpf::Want::Poll } else { ebpf::Want::Auto },
        grow_streams: trials,
        cut_chunks: a.chunk_size.is_none(),
        link_bps: Some(plan.report.probe.bw_bps).filter(|b| b.is_finite() && *b > 0.0),
        ..Default::default()
    };
    opts.control.initial_window = match a.initial_window.as_str() {
        "auto" => (opts.control.acp != AcpKind::Off).then_some(send::FIRST_WINDOW),
        "off" => None,
        size => {
            Some(fmt::parse_size(size).ok().and_then(|b| u32::try_from(b).ok()).filter(|&b| b > 0).context("--initial-window takes auto, off or a size below 4 GiB (e.g. 64KiB)")?)
        }
    };
    // The trace is written as intervals end, so an interrupted send leaves it too.
    let trace_writer = match &a.trace_out {
        Some(path) => {
            use std::io::Write;
            let f = std::fs::File::create(path).with_context(|| format!("creating the trace file {}", path.display()))?;
            let mut w = std::io::LineWriter::new(f);
            writeln!(w, "{}", send::TraceRow::HEADER)?;
            let (tx, rx) = crossbeam_channel::unbounded::<send::TraceRow>();
            opts.control.trace = Some(tx);
            Some(std::thread::spawn(move || {
                for row in rx {
                    let _ = writeln!(w, "{}", row.csv());
                }
            }))
        }
        None => None,
    };
    if let Some(spec) = &a.fault_kill_stream {
        let (s, b) = spec.split_once(':').context("--fault-kill-stream takes IDX:BYTES")?;
        opts.kill = Some(KillStream { stream: s.parse()?, after: fmt::parse_size(b).map_err(anyhow::Error::msg)? });
    }
    let progress = Arc::new(Progress::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let controller = live::spawn(&mut plan, progress.clone(), stop.clone(), a.streams.is_some());
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| fmt::progress_bar(source.size()));
    let watcher = bar.clone().map(|bar| {
        let p = progress.clone();
        std::thread::spawn(move || {
            while !bar.is_finished() {
                let t = p.total.load(Relaxed);
                if t > 0 {
                    bar.set_length(t);
                }
                bar.set_position(p.acked.load(Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    let r = send::send_with(source, &opts, progress, stream0);
    // The options hold the trace channel's sender: dropping them ends the writer's loop.
    drop(opts);
    if let Some(w) = trace_writer {
        let _ = w.join();
    }
    stop.store(true, Relaxed);
    if let Some(c) = controller {
        plan.report.switches = c.join().unwrap_or_default();
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(w) = watcher {
        let _ = w.join();
    }
    let rep = r.with_context(|| format!("sending {} to {}", a.src, a.to))?;
    if a.json {
        println!("{}", fmt::send_json(&rep, Some(live::json(&plan.report))));
    } else {
        print!("{}", fmt::send_table(&rep, &live::rows(&plan.report)));
    }
    if !rep.verified {
        bail!("the receiver's digest did not match ours");
    }
    Ok(())
}

/// `--compress LEVEL`: a zstd level 1-19.
fn zstd_level(l: &str) -> Result<i32> {
    l.parse().ok().filter(|l| (1..=19).contains(l)).context("--compress takes auto, off or a zstd level 1-19")
}

/// Unsent bytes each stream of a QEMU migration may queue in the kernel. Unbounded, the
/// kernel's autotuned socket buffers held what the window let through, still queued when QEMU
/// stopped the VM: on the rig's 50 ms link the downtime was about 510 ms, with 128 KiB 415 ms,
/// with 32 KiB 308 ms, for the same total time.
const NOTSENT_LOWAT: u32 = 32 << 10;

/// The window of a QEMU migration stream: QEMU decides when to stop the VM by how fast its
/// stream drains, and what dwcp holds when it does still has to cross the link during the
/// downtime; about two bandwidth-delay products over the active streams keep the link busy
/// without more: at least 2 chunks per stream, and 4 on paths of 20 ms or more, where a stream
/// recovering a loss holds its chunks a round trip longer (on the rig's 150 ms, 1% loss link,
/// 2 per stream took 13.2-13.3 s, 3 took 11.3-12.0 s, 4 took 11.0-11.2 s; on its 2 ms link, 2
/// per stream cut the downtime from about 800 to 500 ms); 4 when the probe measured no bandwidth.
fn qemu_window(probe: &dataplane::probe::PathEstimate, chunk: u32, active: u16) -> usize {
    if !probe.bw_bps.is_finite() || probe.bw_bps <= 0.0 {
        return 4;
    }
    let bdp = probe.bw_bps / 8.0 * probe.rtt_min.as_secs_f64();
    let least = if probe.rtt_min >= Duration::from_millis(20) { 4 } else { 2 };
    ((2.0 * bdp / (f64::from(active.max(1)) * f64::from(chunk))).ceil() as usize).clamp(least, 32)
}

fn cmd_recv(a: RecvArgs) -> Result<()> {
    let psk = load_key(a.key_file.as_ref())?;
    let sink = match (a.discard, a.out.as_deref()) {
        (true, _) => Sink::Discard,
        (false, Some("-")) => Sink::Stdout,
        (false, Some(d)) => Sink::Dir(PathBuf::from(d)),
        (false, None) => bail!("pass --out DIR, --out - or --discard"),
    };
    let to_stdout = matches!(sink, Sink::Stdout);
    let mut opts = RecvOptions::new(a.listen.clone(), sink, psk);
    opts.allow_plaintext = a.no_encrypt;
    opts.idle_timeout = a.idle_timeout;
    opts.max_chunk = u32::try_from(a.max_chunk).context("--max-chunk too large")?;
    opts.cores = a.cores.clone();
    opts.file_mode = a.file_mode;
    opts.keep_partial = a.keep_partial;
    opts.max_object_size = a.max_object_size;
    opts.handshake_timeout = a.handshake_timeout;
    opts.max_handshakes_per_addr = a.max_handshakes_per_addr;
    #[cfg(feature = "rdma")]
    {
        opts.rdma = (a.rdma == "on").then(|| recv::RdmaRecvOptions {
            device: a.rdma_device.clone(),
            poll: if a.rdma_poll == "event" { dataplane::transport::rdma::Poll::Event } else { dataplane::transport::rdma::Poll::Busy },
        });
    }
    let h = recv::start(opts)?;
    eprintln!("dwcp: listening on {}", h.local_addr);
    for o in h.outcomes.iter() {
        let line = if a.json { fmt::outcome_json(&o) } else { fmt::outcome_line(&o) };
        if a.json && !to_stdout {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
        if a.once {
            h.stop();
            if o.result.is_err() {
                std::process::exit(1);
            }
            return Ok(());
        }
    }
    Ok(())
}

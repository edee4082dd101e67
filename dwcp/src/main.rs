//! `dwcp`: move VM images and byte streams between hosts over many authenticated, encrypted
//! io_uring TCP streams, verified end to end.

mod appliance;
mod fmt;
mod migrate;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ctlplane::engine::{
    self, Request,
    plan::{AcpChoice, Choice, ModeChoice, TransportChoice},
};
use dataplane::crypto::Psk;
use dataplane::recv::{self, RecvOptions, Sink};
#[cfg(feature = "rdma")]
use dataplane::send;
use dataplane::send::KillStream;

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
    /// Send a file, standard input (`-`), the stream of a producer connecting to a Unix socket
    /// (`unix:PATH`) or a generated image (`gen:SIZE[:SEED]`) to a receiver.
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
        /// Pre-shared key file (not with --via-daemon: the daemon uses its own).
        #[arg(long, env = "DWCP_KEY_FILE", required_unless_present = "via_daemon")]
        key_file: Option<PathBuf>,
        /// Stream name at the receiver.
        #[arg(long, default_value = "vmstate")]
        name: String,
        /// Run it as a job of the daemon behind this jobs socket: QEMU's stream goes through
        /// the daemon (on its warm streams to the destination when it keeps them), the job
        /// survives this command, and with --vm the daemon hands the VM over in the fleet.
        #[arg(long, conflicts_with = "send_flags")]
        via_daemon: Option<PathBuf>,
        /// With --via-daemon: seconds from submission by which the destination should have the
        /// whole verified stream (the daemon shares the link earliest deadline first).
        #[arg(long, value_parser = fmt::parse_duration, requires = "via_daemon")]
        deadline: Option<Duration>,
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
        /// `pages`: page-aware (RAM pages delta-encoded across rounds, the rest carried as it
        /// is; falls back to tunnel mode on a stream it cannot parse), or `tunnel`: the stream
        /// as QEMU writes it.
        #[arg(long, default_value = "pages", value_parser = ["pages", "tunnel"])]
        mode: String,
        /// The VM's name in the fleet: the source host's daemon must own it (a VM nobody owns
        /// is claimed), and once the destination has the whole verified stream its ownership
        /// is handed to --to-node; only then may the destination resume (`dwcp fleet resume`).
        #[arg(long, requires = "to_node")]
        vm: Option<String>,
        /// The destination host's fleet node id (with --vm).
        #[arg(long, requires = "vm")]
        to_node: Option<u64>,
        /// The source host daemon's jobs socket (with --vm).
        #[arg(long, env = "DWCP_API_SOCKET", default_value = "/run/dwcp/api.sock")]
        fleet_socket: PathBuf,
        /// Further `dwcp send` flags for the stream (e.g. `--streams 8`), after `--`.
        #[arg(last = true)]
        send_flags: Vec<String>,
    },
    /// Transfers run by a daemon (its `api.socket`): list, watch, cancel. `dwcp send
    /// --via-daemon` submits one.
    Job {
        /// The daemon's jobs socket.
        #[arg(long, env = "DWCP_API_SOCKET", default_value = "/run/dwcp/api.sock", global = true)]
        socket: PathBuf,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// The site's Raft group a daemon belongs to (`[fleet]`): its view, VM ownership, members.
    Fleet {
        /// The daemon's jobs socket.
        #[arg(long, env = "DWCP_API_SOCKET", default_value = "/run/dwcp/api.sock", global = true)]
        socket: PathBuf,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: FleetCmd,
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
    /// Sweep the plan's knobs on loopback or against a peer: every point repeated until its 95%
    /// interval is narrow (or the budget is spent), a CSV of every run (--resume continues it),
    /// plots, and a recommended [transfer] config with its measured gain over the defaults.
    Tune(Box<tuning::tune::TuneArgs>),
    /// Plot a `dwcp send --trace-out` CSV (goodput, PBA's prediction, RTT, pacing, streams
    /// against time) as OUT.svg and OUT.png.
    PlotTrace {
        /// The CSV.
        csv: PathBuf,
        /// Output path without extension (default: beside the CSV).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Render the benches' JSON (target/bench), the microbenchmarks (target/criterion) and the
    /// last sweep (target/tune) into one Markdown page with plots.
    Report {
        /// Bench JSON files.
        #[arg(long, default_value = "target/bench")]
        bench: PathBuf,
        /// Criterion's output.
        #[arg(long, default_value = "target/criterion")]
        criterion: PathBuf,
        /// A `dwcp tune` output directory.
        #[arg(long, default_value = "target/tune")]
        tune: PathBuf,
        /// Where the page and its plots go.
        #[arg(long, default_value = "target/report")]
        out: PathBuf,
        /// Only turn criterion's estimates into BENCH/micro.json, print their table and the
        /// JSON line (what `make bench-micro` ends with).
        #[arg(long)]
        micro_json: bool,
    },
    /// Write the man pages (OUT/man/*.1) and shell completions (OUT/completions: bash, zsh,
    /// fish) generated from this command line; the package build runs it.
    #[command(hide = true)]
    Generate {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
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

#[derive(Subcommand, Debug)]
enum JobCmd {
    /// Every transfer the daemon remembers.
    List,
    /// Follow one until it ends, with a progress bar; the summary at the end.
    Watch {
        /// Its id.
        id: u64,
    },
    /// Cancel one: nothing is published (the receiver keeps what arrived for --resume).
    Cancel {
        /// Its id.
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCmd {
    /// Leader, term, lags, members, and who owns which VM.
    Status,
    /// A VM's owner, as the leader confirms it now.
    Owner {
        /// The VM's name.
        vm: String,
    },
    /// This node (or --node) takes a VM nobody owns.
    Claim {
        /// The VM's name.
        vm: String,
        /// The node taking it (default: the daemon's own).
        #[arg(long)]
        node: Option<u64>,
    },
    /// Moves a VM's ownership from --from at --epoch to --to (refused unless that is the
    /// current owner and epoch).
    Handoff {
        /// The VM's name.
        vm: String,
        /// The current owner.
        #[arg(long)]
        from: u64,
        /// The new owner.
        #[arg(long)]
        to: u64,
        /// The epoch of the current ownership (`dwcp fleet owner VM`).
        #[arg(long)]
        epoch: u64,
    },
    /// Resumes the paused VM behind --qmp only once the fleet has committed that this node,
    /// its owner, runs it (a compare-and-set on the epoch read: a handoff still pending is not
    /// overtaken).
    Resume {
        /// The VM's name.
        vm: String,
        /// Its QEMU's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
    },
    /// Adds node ID at its fleet address (it starts with no members of its own).
    Add {
        /// Its id.
        id: u64,
        /// Its fleet address, HOST:PORT.
        addr: String,
    },
    /// Removes node ID from the group.
    Remove {
        /// Its id.
        id: u64,
    },
}

#[derive(clap::Args, Debug)]
struct SendArgs {
    /// A file path, `-` for standard input, `unix:PATH` for the stream of the one producer that
    /// connects to a Unix socket dwcp binds at PATH (QEMU's `migrate unix:PATH`, libvirt's
    /// `--migrateuri unix://PATH`), or `gen:SIZE[:SEED]` for a generated VM-like image.
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
    /// Configuration file whose [mode] thresholds `--mode auto` uses and whose [transfer] defaults
    /// fill what these flags leave unset (the daemon's file will do; `dwcp tune` writes one).
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
    /// Fault injection for tests: wrong-rkey, past-region or bad-tag.
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
    /// While ACP is in its startup, hold each stream's window to GAIN times what it delivers per
    /// least RTT, so that the streams' BBR startup does not overflow the bottleneck's queue when
    /// the link fills: `auto` (2 under ACP on BBR), `off`, or a gain from 1.25 to 4. The same
    /// sockops program as --initial-window; lifted as soon as ACP paces.
    #[arg(long, default_value = "auto")]
    startup_window: String,
    /// Write each control interval (goodput, srtt, retransmits, pace, PBA's prediction) to FILE
    /// as CSV.
    #[arg(long)]
    trace_out: Option<PathBuf>,
    /// The transfer should be verified within this long (e.g. 90s). Through the daemon
    /// (`--via-daemon`), the job says while it runs whether PBA predicts it will be (`dwcp job
    /// list`); a send here says at the end whether it was. It changes nothing of how it is sent.
    #[arg(long, value_parser = fmt::parse_duration)]
    deadline: Option<Duration>,
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
    /// Have the daemon listening on this jobs socket (`api.socket`) send it, with its key,
    /// and follow it here (the transfer goes on if this command is interrupted).
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["key_file", "fault_kill_stream", "fault_rdma"])]
    via_daemon: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RecvArgs {
    /// Address to listen on, HOST:PORT.
    #[arg(long, default_value = "0.0.0.0:7470")]
    listen: String,
    /// Output directory (objects land there under their names), `-` for standard output, or
    /// `unix:PATH` for a Unix socket it connects to when a stream arrives (a destination QEMU's
    /// `-incoming unix:PATH`; one stream at a time, like standard output).
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
        Cmd::Daemon { config, listen, api } => appliance::run(config, listen, api, (cli.verbose > 0).then_some(level)),
        Cmd::Status { api, json } => appliance::status(&api, json),
        Cmd::Job { socket, json, cmd } => match cmd {
            JobCmd::List => appliance::job_list(&socket, json),
            JobCmd::Watch { id } => appliance::job_watch(&socket, id, json),
            JobCmd::Cancel { id } => appliance::job_cancel(&socket, id, json),
        },
        Cmd::Fleet { socket, json, cmd } => match cmd {
            FleetCmd::Status => appliance::fleet_status(&socket, json),
            FleetCmd::Owner { vm } => appliance::fleet_call(&socket, "GET", &format!("/fleet/vms/{vm}"), "", json),
            FleetCmd::Claim { vm, node } => appliance::fleet_call(&socket, "POST", &format!("/fleet/vms/{vm}/claim"), &serde_json::json!({ "node": node }).to_string(), json),
            FleetCmd::Handoff { vm, from, to, epoch } => {
                appliance::fleet_call(&socket, "POST", &format!("/fleet/vms/{vm}/handoff"), &serde_json::json!({ "from": from, "to": to, "epoch": epoch }).to_string(), json)
            }
            FleetCmd::Resume { vm, qmp } => migrate::resume_if_owned(&socket, &vm, &qmp, json),
            FleetCmd::Add { id, addr } => appliance::fleet_call(&socket, "POST", "/fleet/members", &serde_json::json!({ "id": id, "addr": addr }).to_string(), json),
            FleetCmd::Remove { id } => appliance::fleet_call(&socket, "DELETE", &format!("/fleet/members/{id}"), "", json),
        },
        Cmd::Migrate { qmp, to, key_file, name, json, mode, vm, to_node, fleet_socket, send_flags, via_daemon: Some(sock), deadline } => {
            let _ = (key_file, send_flags, fleet_socket);
            migrate::via_daemon(&sock, &qmp, &to, &name, mode == "pages", vm.zip(to_node), deadline, json)
        }
        Cmd::Migrate { qmp, to, key_file, name, json, mode, vm, to_node, fleet_socket, send_flags, via_daemon: None, .. } => {
            let handoff = vm.zip(to_node).map(|(vm, to_node)| migrate::Handoff { socket: fleet_socket, vm, to_node });
            match key_file {
                Some(key_file) => migrate::run(&migrate::MigrateArgs { qmp, to, key_file, name, pages: mode == "pages", send_flags, json, handoff }),
                None => Err(anyhow::anyhow!("--key-file is needed without --via-daemon")),
            }
        }
        Cmd::Config { cmd: ConfigCmd::Check { file } } => appliance::check(&file),
        Cmd::Generate { out } => generate(&out),
        Cmd::Tune(a) => tuning::tune::run(&a).map_err(anyhow::Error::msg),
        Cmd::Report { bench, criterion, tune, out, micro_json } => report(&bench, &criterion, &tune, &out, micro_json),
        Cmd::PlotTrace { csv, out } => {
            let out = out.unwrap_or_else(|| csv.with_extension(""));
            tuning::plot::trace(&csv, &out).map_err(anyhow::Error::msg).map(|()| println!("{} and {}", out.with_extension("svg").display(), out.with_extension("png").display()))
        }
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
        std::process::exit(exit_code(&e));
    }
}

/// The exit status of a failure, so a script can tell them apart (README, "Exit status"): 2 a
/// usage error (also clap's), 3 a key file that cannot be used, 4 a handshake the receiver
/// refused (wrong key), 5 a receiver not reached or gone, 6 a digest that did not match, 7 a
/// session the receiver ended, 8 cancelled, 9 a local I/O error, 1 anything else.
fn exit_code(e: &anyhow::Error) -> i32 {
    use ctlplane::engine::{EngineError, Failure};
    if let Some(f) = e.chain().find_map(|c| c.downcast_ref::<EngineError>()).map(EngineError::failure) {
        return match f {
            Failure::Invalid => 2,
            Failure::Auth => 4,
            Failure::Connect => 5,
            Failure::Digest => 6,
            Failure::Receiver => 7,
            Failure::Cancelled => 8,
            Failure::Io => 9,
        };
    }
    if e.chain().any(|c| c.downcast_ref::<DigestMismatch>().is_some()) {
        return 6;
    }
    if e.chain().any(|c| c.downcast_ref::<Usage>().is_some()) {
        return 2;
    }
    if e.chain().any(|c| c.downcast_ref::<dataplane::crypto::CryptoError>().is_some()) {
        return 3;
    }
    1
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

fn request(a: &SendArgs) -> Result<Request> {
    let choice = |s: &str| match s {
        "on" => Choice::On,
        "off" => Choice::Off,
        _ => Choice::Auto,
    };
    Ok(Request {
        to: a.to.clone(),
        source: a.src.clone(),
        name: a.name.clone(),
        mode: match a.mode.as_str() {
            "datacenter" => ModeChoice::Datacenter,
            "internet" => ModeChoice::Internet,
            _ => ModeChoice::Auto,
        },
        streams: a.streams,
        chunk_size: a.chunk_size.map(u32::try_from).transpose().context("chunk size too large")?,
        encrypt: match (a.encrypt, a.no_encrypt) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        transport: match a.transport.as_str() {
            "rdma" => TransportChoice::Rdma,
            "tcp" => TransportChoice::Tcp,
            _ => TransportChoice::Auto,
        },
        resume: a.resume,
        window: a.window,
        read_ahead: a.read_ahead,
        notsent_lowat: a.notsent_lowat.map(|b| u32::try_from(b).unwrap_or(u32::MAX)),
        zerocopy: choice(&a.zerocopy),
        idle_timeout_ms: Some(a.idle_timeout.as_millis() as u64),
        cores: a.cores.clone(),
        hde: choice(&a.hde),
        round_of: a.round_of.clone(),
        dirty: a.dirty.clone(),
        dirty_unit: Some(fmt::parse_size(&a.dirty_unit).map_err(anyhow::Error::msg).context("--dirty-unit")?),
        compress: a.compress.parse().map_err(|_| anyhow::anyhow!("--compress takes auto, off or a zstd level 1-19"))?,
        qemu: a.qemu,
        hde_cache: Some(fmt::parse_size(&a.hde_cache).map_err(anyhow::Error::msg).context("--hde-cache")?),
        acp: match a.acp.as_str() {
            "off" => AcpChoice::Off,
            "delay" => AcpChoice::Delay,
            "bbr-model" => AcpChoice::BbrModel,
            _ => AcpChoice::Auto,
        },
        cc: a.cc.clone(),
        monitor_poll: a.monitor == "poll",
        initial_window: match a.initial_window.as_str() {
            "auto" => None,
            "off" => Some(0),
            size => Some(
                fmt::parse_size(size).ok().and_then(|b| u32::try_from(b).ok()).filter(|&b| b > 0).context("--initial-window takes auto, off or a size below 4 GiB (e.g. 64KiB)")?,
            ),
        },
        startup_window: match a.startup_window.as_str() {
            "auto" => None,
            "off" => Some(0.0),
            // The plan checks the gain's range, for every caller.
            g => Some(g.parse::<f64>().ok().context("--startup-window takes auto, off or a gain from 1.25 to 4")?),
        },
        trace_out: a.trace_out.clone(),
        deadline_s: a.deadline.map(|d| d.as_secs_f64()),
        rdma_device: a.rdma_device.clone(),
        rdma_qps: a.rdma_qps,
        rdma_event: a.rdma_poll == "event",
        migrate: None,
    })
}

fn cmd_send(a: SendArgs) -> Result<()> {
    if let Some(sock) = &a.via_daemon {
        let mut req = request(&a).map_err(|e| Usage(format!("{e:#}")))?;
        req.check_detached("the daemon").map_err(|e| anyhow::anyhow!("{e}, or send without --via-daemon"))?;
        // The daemon reads the file from its own working directory: name it absolutely.
        if !req.source.starts_with("gen:") {
            req.source = std::path::absolute(&req.source).with_context(|| format!("cannot name {} absolutely", req.source))?.display().to_string();
        }
        return appliance::job_submit(sock, &req, a.json);
    }
    let psk = load_key(a.key_file.as_ref())?;
    let mut req = request(&a).map_err(|e| Usage(format!("{e:#}")))?;
    let thresholds = match &a.config {
        Some(p) => {
            let cfg = ctlplane::config::Config::load(Some(p), std::env::vars(), &[])?;
            req.apply_defaults(&cfg.transfer);
            cfg.thresholds()
        }
        None => ctlplane::mode::Thresholds::default(),
    };
    let host = engine::host(a.cores.as_deref())?;
    // The hidden fault-injection flags of the tests: passed beside the options, never in them.
    let kill = match &a.fault_kill_stream {
        Some(spec) => {
            let (s, b) = spec.split_once(':').context("--fault-kill-stream takes IDX:BYTES")?;
            Some(KillStream { stream: s.parse()?, after: fmt::parse_size(b).map_err(anyhow::Error::msg)? })
        }
        None => None,
    };
    let rdma_fault = match a.fault_rdma.as_deref() {
        Some("wrong-rkey") => Some(send::RdmaFault::WrongRkey),
        Some("past-region") => Some(send::RdmaFault::PastRegion),
        Some("bad-tag") => Some(send::RdmaFault::BadTag),
        Some(other) => bail!("--fault-rdma takes wrong-rkey, past-region or bad-tag, not {other}"),
        None => None,
    };
    let started = std::time::Instant::now();
    let deadline = req.deadline_s;
    let t = engine::start(req, psk, host, thresholds, send::Faults { kill, rdma: rdma_fault })?;
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| fmt::progress_bar(t.size()));
    let watcher = bar.clone().map(|bar| {
        let p = t.progress().clone();
        std::thread::spawn(move || {
            while !bar.is_finished() {
                let total = p.total.load(Relaxed);
                if total > 0 {
                    bar.set_length(total);
                }
                bar.set_position(p.acked.load(Relaxed));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    });
    let r = t.wait();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    if let Some(w) = watcher {
        let _ = w.join();
    }
    let out = r?;
    if a.json {
        println!("{}", out.json());
    } else {
        print!("{}", fmt::send_table(&out.report, &engine::live::rows(&out.plan, &out.switches)));
        if let Some(due) = deadline {
            let at = started.elapsed().as_secs_f64();
            let d = ctlplane::itp::deadline_ended(due, at, out.report.verified);
            println!("deadline: {} ({at:.1} s of {due:.1} s)", d.verdict);
        }
    }
    if !out.report.verified {
        return Err(DigestMismatch.into());
    }
    Ok(())
}

/// A flag's value that does not parse (exit status 2, as clap's own usage errors).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A send the receiver did not verify (exit status 6).
#[derive(Debug)]
struct DigestMismatch;

impl std::fmt::Display for DigestMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the receiver's digest did not match ours")
    }
}

impl std::error::Error for DigestMismatch {}

fn report(bench: &std::path::Path, criterion: &std::path::Path, tune: &std::path::Path, out: &std::path::Path, micro_json: bool) -> Result<()> {
    if micro_json {
        let ms = tuning::report::criterion(criterion);
        if ms.is_empty() {
            bail!("no criterion estimates under {}: run cargo bench -p benches --bench micro first", criterion.display());
        }
        print!("{}", tuning::report::micro_table(&ms));
        let j = tuning::report::micro_json(&ms);
        std::fs::create_dir_all(bench).with_context(|| format!("creating {}", bench.display()))?;
        std::fs::write(bench.join("micro.json"), format!("{j}\n")).with_context(|| format!("writing {}/micro.json", bench.display()))?;
        println!("{j}");
        return Ok(());
    }
    let page = tuning::report::render(bench, criterion, tune, out).map_err(anyhow::Error::msg)?;
    println!("{}", page.display());
    Ok(())
}

/// Man pages and shell completions, from the same definitions the parser uses.
fn generate(out: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    let (man, comp) = (out.join("man"), out.join("completions"));
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // No `help` subcommands: they would each get a page of their own.
    fn no_help(c: clap::Command) -> clap::Command {
        c.disable_help_subcommand(true).mut_subcommands(no_help)
    }
    let mut cmd = no_help(Cli::command());
    clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "dwcp", &comp).with_context(|| format!("writing {shell} completions to {}", comp.display()))?;
    }
    Ok(())
}

fn cmd_recv(a: RecvArgs) -> Result<()> {
    let psk = load_key(a.key_file.as_ref())?;
    let sink = match (a.discard, a.out.as_deref()) {
        (true, _) => Sink::Discard,
        (false, Some("-")) => Sink::Stdout,
        (false, Some(u)) if u.starts_with("unix:") => {
            let p = &u["unix:".len()..];
            Sink::Unix(PathBuf::from(p.strip_prefix("//").unwrap_or(p)))
        }
        (false, Some(d)) => Sink::Dir(PathBuf::from(d)),
        (false, None) => bail!("pass --out DIR, --out -, --out unix:PATH or --discard"),
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

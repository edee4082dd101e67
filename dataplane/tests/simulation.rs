//! Deterministic simulation of the transfer protocol's integrity logic, free of I/O and time:
//! the sender's chunk plan (`session::plan_chunks`, resuming from what the receiver holds), the
//! receiver's ledger (`recv::ledger::Ledger`: placements, journal records, a resume's verified
//! restore, the commit's verdict), the journal format and the whole-object digest, all the
//! production code, driven over a simulated network and disk with seeded faults: streams that
//! die with chunks in flight (re-queued on the others, so a chunk may arrive twice), reordering
//! across streams, receiver crashes (the journal loses what was not flushed; chunks written
//! since the last sync may be torn), a full disk, and a sender that lies about a chunk.
//!
//! Invariants checked on every run: a published object is byte-exact; a session publishes at
//! most once; a resumed session sends only what the receiver does not hold; a failed session
//! publishes nothing; no chunk is acknowledged before it is placed. Seeds that once failed are
//! kept in `REGRESSIONS`.

use std::collections::VecDeque;

use dataplane::recv::ledger::Ledger;
use dataplane::session::{JournalHeader, RangeSet, parse_journal, plan_chunks};
use dataplane::wire::{self, Commit, ManifestDigest};

/// xorshift64*: the simulation's only source of chance.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// The faults of one run.
#[derive(Debug, Clone, Copy)]
struct Faults {
    /// Per mille, per chunk sent: the stream carrying it dies (its unacknowledged chunks are
    /// re-queued on the others; if none is left, the sender reconnects and resumes).
    stream_death: u64,
    /// Per mille, per step: the receiver crashes (the sender resumes against a new one).
    crash: u64,
    /// The disk holds this many bytes of writes in all (`None`: unbounded).
    disk: Option<u64>,
    /// One chunk's bytes differ from what the sender's checksum and digest say.
    liar: bool,
}

/// The receiver's disk: the partial output, its journal, and what a crash keeps of them.
struct Disk {
    part: Vec<u8>,
    journal: Vec<u8>,
    /// Chunks written since the last sync: a crash may tear them.
    unsynced: Vec<(u64, u32)>,
    written: u64,
}

/// What one run did.
#[derive(Debug, Default)]
struct Run {
    published: u32,
    failed: bool,
    resumes: u32,
    crashes: u32,
    chunks_sent: u64,
    duplicates: u64,
}

const CHUNK: u32 = 4096;

/// One transfer of a seeded object under seeded faults; panics when an invariant breaks.
fn simulate(seed: u64, f: Faults) -> Run {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let size = 1 + rng.below(96) * u64::from(CHUNK) / 2 + rng.below(u64::from(CHUNK));
    let object: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
    let streams = 1 + rng.below(4) as usize;
    let lie_at = f.liar.then(|| rng.below(size.div_ceil(u64::from(CHUNK))) * u64::from(CHUNK));
    let header = JournalHeader { object_size: size, object_id: seed, chunk_size: CHUNK };
    let mut disk = Disk { part: vec![0; size as usize], journal: header.encode().to_vec(), unsynced: Vec::new(), written: 0 };
    let mut run = Run::default();
    // The sender's digest is over what it believes it sends.
    let mut digest = ManifestDigest::default();
    for (o, l) in plan_chunks(size, CHUNK, &RangeSet::default()) {
        digest.add(o, l, wire::checksum(&object[o as usize..o as usize + l as usize]));
    }
    let commit = Commit { size, digest: digest.finish(size).unwrap() };
    let bytes_of = |o: u64, l: u32| -> Vec<u8> {
        let mut b = object[o as usize..o as usize + l as usize].to_vec();
        if lie_at == Some(o) {
            b[0] ^= 0x5a;
        }
        b
    };

    'session: for attempt in 0..20 {
        // The receiver (re)opens the session: a resume restores what the journal and the
        // partial output prove; the sender plans only the rest.
        let mut ledger = Ledger::new(Some(size));
        if attempt > 0 {
            run.resumes += 1;
            let (h, recs) = parse_journal(&disk.journal).expect("the journal parses");
            assert_eq!(h, header);
            ledger.restore(recs, CHUNK, |o, l| disk.part.get(o as usize..o as usize + l as usize).map(<[u8]>::to_vec));
            // A fresh journal holding the verified records, as the receiver writes it.
            disk.journal = header.encode().to_vec();
            for r in ledger.journal() {
                disk.journal.extend_from_slice(&r.encode());
            }
        }
        ledger.start_journal();
        let have = ledger.have().clone();
        let plan = plan_chunks(size, CHUNK, &have);
        for &(o, l) in &plan {
            assert!(have.ranges().iter().all(|&(a, b)| b <= o || a >= o + u64::from(l)), "seed {seed}: a resume re-sends held bytes at {o}");
        }
        let mut queue: VecDeque<(u64, u32)> = plan.into_iter().collect();
        // Per stream: chunks on the wire, and chunks placed whose acknowledgement is on its way.
        let mut wire_q: Vec<VecDeque<(u64, u32)>> = vec![VecDeque::new(); streams];
        let mut unacked: Vec<Vec<(u64, u32)>> = vec![Vec::new(); streams];
        let mut alive = vec![true; streams];
        let mut arrived_before = std::collections::HashSet::new();
        loop {
            // Crash: unflushed journal records are lost; unsynced chunks may be torn.
            if rng.chance(f.crash) {
                run.crashes += 1;
                for &(o, l) in &disk.unsynced {
                    if rng.chance(500) {
                        disk.part[(o + rng.below(u64::from(l))) as usize] ^= 0xff;
                    }
                }
                disk.unsynced.clear();
                continue 'session;
            }
            // Send: the next chunk onto the live stream with the most room (a window of 4).
            if let Some(s) = (0..streams).filter(|&s| alive[s] && wire_q[s].len() + unacked[s].len() < 4).min_by_key(|&s| wire_q[s].len() + unacked[s].len())
                && let Some(c) = queue.pop_front()
            {
                run.chunks_sent += 1;
                wire_q[s].push_back(c);
            }
            // A stream dies: what it has not had acknowledged goes again on the others (some of
            // it was placed already, and arrives twice).
            if let Some(s) = (0..streams).find(|&s| alive[s] && !(wire_q[s].is_empty() && unacked[s].is_empty()))
                && rng.chance(f.stream_death)
            {
                alive[s] = false;
                queue.extend(wire_q[s].drain(..));
                queue.extend(unacked[s].drain(..));
            }
            if !alive.iter().any(|&a| a) {
                // Every stream lost: the sender reconnects and resumes.
                continue 'session;
            }
            // One event: a chunk arrives from a stream's head (streams reorder among
            // themselves), or an acknowledgement comes back.
            let arrivals: Vec<usize> = (0..streams).filter(|&s| alive[s] && !wire_q[s].is_empty()).collect();
            let acks: Vec<usize> = (0..streams).filter(|&s| alive[s] && !unacked[s].is_empty()).collect();
            if arrivals.is_empty() && acks.is_empty() {
                if queue.is_empty() {
                    break;
                }
                continue;
            }
            if !acks.is_empty() && (arrivals.is_empty() || rng.chance(500)) {
                let s = acks[rng.below(acks.len() as u64) as usize];
                let (o, _) = unacked[s].remove(0);
                // Acknowledged only once placed.
                assert!(ledger.placed(o), "seed {seed}: chunk {o} acknowledged before it was placed");
                continue;
            }
            let s = arrivals[rng.below(arrivals.len() as u64) as usize];
            let (o, l) = wire_q[s].pop_front().expect("ready");
            let data = bytes_of(o, l);
            if !arrived_before.insert(o) {
                run.duplicates += 1;
            }
            // The receiver writes it; a full disk fails the session.
            if f.disk.is_some_and(|cap| disk.written + u64::from(l) > cap) {
                run.failed = true;
                break 'session;
            }
            disk.part[o as usize..o as usize + l as usize].copy_from_slice(&data);
            disk.written += u64::from(l);
            disk.unsynced.push((o, l));
            // It checks the frame's checksum, which the sender computed over the bytes it put
            // on the wire (a liar's wrong bytes still carry a matching frame checksum).
            ledger.place(o, l, wire::checksum(&data));
            if rng.chance(200) {
                disk.journal.extend(ledger.take_journal());
            }
            unacked[s].push((o, l));
        }
        // Commit: the verdict, then the digest compared; published at most once.
        assert_eq!(ledger.have().covered(), size, "seed {seed}: every byte held at the commit");
        disk.journal.extend(ledger.take_journal());
        let verdict = ledger.verdict(&commit);
        if let Ok(d) = verdict
            && d == commit.digest
        {
            run.published += 1;
            assert!(disk.part == object, "seed {seed}: published bytes differ from the object");
            assert!(ledger.verdict(&commit).is_err(), "seed {seed}: a second verdict");
        } else {
            run.failed = true;
        }
        break;
    }
    assert!(run.published <= 1, "seed {seed}: published {} times", run.published);
    if run.failed {
        assert_eq!(run.published, 0, "seed {seed}: a failed session published");
    }
    run
}

/// Seeds that broke an invariant while the simulation was written (none yet in production code).
const REGRESSIONS: &[(u64, Faults)] = &[];

#[test]
fn thousands_of_simulated_transfers_keep_every_invariant() {
    let cases = [
        ("clean", Faults { stream_death: 0, crash: 0, disk: None, liar: false }),
        ("streams die", Faults { stream_death: 30, crash: 0, disk: None, liar: false }),
        ("receiver crashes", Faults { stream_death: 10, crash: 8, disk: None, liar: false }),
        ("full disk", Faults { stream_death: 10, crash: 0, disk: Some(96 << 10), liar: false }),
        ("lying sender", Faults { stream_death: 10, crash: 4, disk: None, liar: true }),
    ];
    for &(seed, f) in REGRESSIONS {
        simulate(seed, f);
    }
    let t = std::time::Instant::now();
    let mut total = 0u64;
    for (name, f) in cases {
        let mut sum = Run::default();
        let n = 2000;
        for seed in 0..n {
            let r = simulate(seed, f);
            sum.published += r.published;
            sum.resumes += r.resumes;
            sum.crashes += r.crashes;
            sum.duplicates += r.duplicates;
            sum.chunks_sent += r.chunks_sent;
            sum.failed |= r.failed;
        }
        total += n;
        eprintln!("{name}: {n} transfers, {} published, {} crashes, {} resumes, {} duplicate arrivals, {} chunks sent", sum.published, sum.crashes, sum.resumes, sum.duplicates, sum.chunks_sent);
        match name {
            "clean" | "streams die" | "receiver crashes" => assert!(sum.published as u64 >= n * 9 / 10, "{name}: {} of {n} published", sum.published),
            "lying sender" => assert_eq!(sum.published, 0, "a wrong byte never publishes"),
            _ => {}
        }
        if name == "receiver crashes" {
            assert!(sum.crashes > 0 && sum.resumes > 0, "the crash case must crash and resume");
        }
        if name == "streams die" {
            assert!(sum.duplicates > 0 || sum.resumes > 0, "stream deaths must re-send");
        }
    }
    let secs = t.elapsed().as_secs_f64();
    eprintln!("{total} simulated transfers in {secs:.2} s: {:.0} per second", total as f64 / secs);
}

/// A restore that trusted the journal without re-reading the bytes would publish a torn chunk:
/// shown by a ledger fed the journal's records as they are.
#[test]
fn a_journaled_chunk_torn_by_a_crash_is_sent_again() {
    let data = vec![7u8; 8192];
    let mut ledger = Ledger::new(Some(8192));
    ledger.start_journal();
    ledger.place(0, 4096, wire::checksum(&data[..4096]));
    ledger.place(4096, 4096, wire::checksum(&data[4096..]));
    let mut journal = JournalHeader { object_size: 8192, object_id: 1, chunk_size: CHUNK }.encode().to_vec();
    journal.extend(ledger.take_journal());
    let mut torn = data.clone();
    torn[5000] ^= 1;
    let (_, recs) = parse_journal(&journal).unwrap();
    let mut again = Ledger::new(Some(8192));
    again.restore(recs, CHUNK, |o, l| Some(torn[o as usize..o as usize + l as usize].to_vec()));
    assert_eq!(plan_chunks(8192, CHUNK, again.have()), vec![(4096, 4096)], "only the torn chunk is sent again");
}

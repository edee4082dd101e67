//! Page-aware mode of live migration: a lossless transform of QEMU's migration stream, free of
//! I/O. The [`Encoder`] parses the stream QEMU writes (format version 3, as QEMU 7.2 writes it:
//! `migration/savevm.c` sections, `migration/ram.c` page records), cuts it into batches, and
//! sends the RAM pages of each batch through HDE ([`crate::hde`]): a page QEMU sends again in a
//! later round travels as a delta against the copy the receiver got in the previous one, or as a
//! duplicate of a page the receiver holds, or zstd. Everything else (section headers, zero-page
//! records, device state, the end of the stream) is carried as it is, zstd-compressed. The
//! [`Decoder`] rebuilds the exact bytes QEMU wrote and hands them to the destination QEMU.
//!
//! Nothing unverified reaches the destination: every page is checked against its checksum as
//! HDE decodes it, and each batch's rebuilt bytes against the XXH3 the encoder took of the
//! original bytes, before any of them is released; the end record carries the length and
//! XXH3-128 of the whole stream. Whatever the parser does not understand (another stream
//! version, capabilities that change the RAM records such as xbzrle, compression or
//! x-ignore-shared, postcopy commands, an iterative section other than RAM) switches it to
//! passthrough for the rest of the stream, with the reason: the stream is still carried exactly
//! (tunnel mode), only without page awareness.
//!
//! Encoded stream: records `tag u8 | len u32 LE | body`:
//! - `H`: `"DWQ1"`, the first record.
//! - `F`: a batch: `out_len u32 | out_sum u64 | skel_len u32 | skeleton (zstd) | HDE frame`.
//!   The skeleton lists the batch's items in stream order (LEB128 numbers): `0 len bytes`
//!   (opaque bytes), `1 flags block index` (a page record: its bytes are the HDE frame's next
//!   page), `2 flags block index fill` (a zero-page record; the receiver's copy of the page
//!   becomes `fill` bytes, sent as the HDE frame's next page too, so both sides agree), `3
//!   name_len name pages` (a RAM block, from QEMU's setup record).
//! - `P`: the parser fell back to passthrough: the reason, UTF-8.
//! - `R`: passthrough bytes: `out_sum u64 | zstd u8 (0/1) | data`.
//! - `E`: the end: `total u64 | XXH3-128 u128` of the whole rebuilt stream.

use std::collections::HashSet;

use thiserror::Error;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::hde::{self, EncodeStats, PAGE, PageStore, put_leb};

const MAGIC: &[u8; 4] = b"DWQ1";
/// QEMU's stream magic ("QEVM") and the version it writes.
const QEVM: &[u8; 4] = b"QEVM";
const QEMU_VERSION: u32 = 3;

// Section types (`migration/savevm.c`).
const SEC_START: u8 = 0x01;
const SEC_PART: u8 = 0x02;
const SEC_END: u8 = 0x03;
const SEC_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const EOF: u8 = 0x09;
const FOOTER: u8 = 0x7e;

// RAM record flags (`migration/ram.c`), in the low bits of the page address.
const F_ZERO: u64 = 0x02;
const F_MEM_SIZE: u64 = 0x04;
const F_PAGE: u64 = 0x08;
const F_EOS: u64 = 0x10;
const F_CONTINUE: u64 = 0x20;
const FLAG_MASK: u64 = PAGE as u64 - 1;

/// The RAM section's version in QEMU's stream.
const RAM_VERSION: u32 = 4;

/// Pages per batch: large enough for zstd to see context, small enough that QEMU's view of the
/// link (it paces its rounds by how fast its output drains) stays close to the truth.
pub const BATCH_PAGES: usize = 256;
/// Most bytes of one passthrough record (the decoder's bound on what it decompresses).
const MAX_RAW: usize = 1 << 20;
/// Longest record: a batch of pages, raw, with its skeleton (a batch closes at 1 MiB of
/// opaque bytes or 256 pages, and the item that closes it may be a 1 MiB opaque run).
const MAX_RECORD: usize = 8 << 20;
/// Opaque bytes that close a batch on their own.
const BATCH_OPAQUE: usize = 1 << 20;
/// The most a batch can rebuild: its opaque bytes (up to the record's size, as the item that
/// closes a batch may be one long run) and 256 pages, each with its header and block name.
const BATCH_OUT_MAX: usize = MAX_RECORD + BATCH_PAGES * (8 + 1 + 255 + PAGE);
/// RAM blocks a stream may define (QEMU defines a handful: RAM, ROMs, VGA, ...).
const BLOCKS_MAX: usize = 1024;

fn flag_names(f: u64) -> String {
    let names = [
        (0x01, "FULL"),
        (0x02, "ZERO"),
        (0x04, "MEM_SIZE"),
        (0x08, "PAGE"),
        (0x10, "EOS"),
        (0x20, "CONTINUE"),
        (0x40, "XBZRLE"),
        (0x80, "HOOK"),
        (0x100, "COMPRESS_PAGE"),
        (0x200, "MULTIFD_FLUSH"),
    ];
    let v: Vec<&str> = names.iter().filter(|(b, _)| f & b != 0).map(|(_, n)| *n).collect();
    if v.is_empty() { format!("{f:#x}") } else { format!("{f:#x} ({})", v.join("|")) }
}

// ---------------------------------------------------------------- parser

/// One thing the parser found at the front of its input.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// `n` bytes carried as they are.
    Opaque(usize),
    /// A page record of `n` bytes, its page the last 4096.
    Page { n: usize, flags: u64, block: u32, index: u64 },
    /// A zero-page record of `n` bytes.
    Zero { n: usize, flags: u64, block: u32, index: u64, fill: u8 },
    /// The RAM setup record (`n` bytes) and the blocks it defines: name, pages.
    Blocks { n: usize, blocks: Vec<(String, u64)> },
}

/// What the parser needs or found.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// More input first.
    Need,
    /// An item.
    Item(Item),
    /// Not understood: pass the rest through, for this reason (`None`: the RAM part of the
    /// stream is over, the rest is device state).
    Pass(Option<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Top,
    Ram,
}

/// A bounds-checked reader over the front of the input; `None` means "not enough yet".
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn be32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().expect("4")))
    }
    fn be64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().expect("8")))
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }
    /// A length-prefixed (u8) name.
    fn name(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
}

/// The parser of QEMU's stream, as far as page awareness needs it.
#[derive(Debug)]
struct Parser {
    state: State,
    ram_section: Option<u32>,
    /// Block names and sizes in pages, from the setup record.
    blocks: Vec<(Vec<u8>, u64)>,
    /// The block of the last page record (`CONTINUE` refers to it).
    current: Option<u32>,
}

impl Parser {
    fn new() -> Self {
        Self { state: State::Header, ram_section: None, blocks: Vec::new(), current: None }
    }

    fn step(&mut self, b: &[u8]) -> Step {
        let mut c = Cur { b, at: 0 };
        match self.state {
            State::Header => self.header(&mut c),
            State::Top => self.top(&mut c),
            State::Ram => self.ram(&mut c),
        }
        .unwrap_or(Step::Need)
    }

    fn header(&mut self, c: &mut Cur) -> Option<Step> {
        let magic = c.take(4)?;
        if magic != QEVM {
            return Some(Step::Pass(Some(format!("not a QEMU migration stream (starts with {magic:02x?}, not \"QEVM\")"))));
        }
        let v = c.be32()?;
        if v != QEMU_VERSION {
            return Some(Step::Pass(Some(format!("QEMU stream version {v}, page-aware mode reads version {QEMU_VERSION}"))));
        }
        self.state = State::Top;
        Some(Step::Item(Item::Opaque(c.at)))
    }

    fn top(&mut self, c: &mut Cur) -> Option<Step> {
        let t = c.u8()?;
        match t {
            CONFIGURATION => {
                let len = c.be32()? as usize;
                if len > 256 {
                    return Some(Step::Pass(Some(format!("configuration section with a {len}-byte machine name"))));
                }
                c.take(len)?;
                // Subsections follow while the next byte says so; the stream always goes on
                // after the configuration, so that byte is awaited.
                while c.peek()? == SUBSECTION {
                    c.u8()?;
                    let name = String::from_utf8_lossy(c.name()?).into_owned();
                    c.be32()?;
                    match name.as_str() {
                        "configuration/uuid" => {
                            c.take(16)?;
                        }
                        "configuration/capabilities" => {
                            let n = c.be32()?;
                            let mut caps = Vec::new();
                            for _ in 0..n.min(64) {
                                caps.push(String::from_utf8_lossy(c.name()?).into_owned());
                            }
                            return Some(Step::Pass(Some(format!("the source validates capabilities [{}], which change RAM records", caps.join(", ")))));
                        }
                        other => return Some(Step::Pass(Some(format!("configuration subsection {other} (page size or format differs)")))),
                    }
                }
                Some(Step::Item(Item::Opaque(c.at)))
            }
            SEC_START | SEC_FULL => {
                let id = c.be32()?;
                let name = c.name()?.to_vec();
                let _instance = c.be32()?;
                let version = c.be32()?;
                if t == SEC_FULL {
                    // Device state: after RAM's last round, the rest of the stream.
                    let why = if self.ram_section.is_some() { None } else { Some(format!("device state ({}) before any RAM section", String::from_utf8_lossy(&name))) };
                    return Some(Step::Pass(why));
                }
                if name != b"ram" {
                    return Some(Step::Pass(Some(format!("iterative section {:?} is not RAM (block migration or dirty bitmaps?)", String::from_utf8_lossy(&name)))));
                }
                if version != RAM_VERSION {
                    return Some(Step::Pass(Some(format!("RAM section version {version}, page-aware mode reads {RAM_VERSION}"))));
                }
                self.ram_section = Some(id);
                self.state = State::Ram;
                Some(Step::Item(Item::Opaque(c.at)))
            }
            SEC_PART | SEC_END => {
                let id = c.be32()?;
                if Some(id) != self.ram_section {
                    return Some(Step::Pass(Some(format!("section {id} is iterative and not RAM"))));
                }
                self.state = State::Ram;
                Some(Step::Item(Item::Opaque(c.at)))
            }
            FOOTER => {
                c.be32()?;
                Some(Step::Item(Item::Opaque(c.at)))
            }
            EOF => Some(Step::Pass(None)),
            COMMAND => Some(Step::Pass(Some("QEMU sends commands in the stream (postcopy or a return path)".into()))),
            other => Some(Step::Pass(Some(format!("unknown section type {other:#04x}")))),
        }
    }

    fn block_of(&mut self, c: &mut Cur, flags: u64) -> Option<Result<u32, String>> {
        if flags & F_CONTINUE != 0 {
            return Some(self.current.ok_or_else(|| "a page record continues a block before any was named".to_string()));
        }
        let name = c.name()?;
        Some(match self.blocks.iter().position(|(n, _)| n == name) {
            Some(i) => {
                self.current = Some(i as u32);
                Ok(i as u32)
            }
            None => Err(format!("page of RAM block {:?}, which the setup record did not define", String::from_utf8_lossy(name))),
        })
    }

    fn ram(&mut self, c: &mut Cur) -> Option<Step> {
        let h = c.be64()?;
        let (flags, addr) = (h & FLAG_MASK, h & !FLAG_MASK);
        let kind = flags & !F_CONTINUE;
        if kind == F_MEM_SIZE {
            if !self.blocks.is_empty() {
                return Some(Step::Pass(Some("a second RAM setup record".into())));
            }
            let mut sum = 0u64;
            let mut blocks = Vec::new();
            while sum < addr {
                let name = c.name()?;
                let used = c.be64()?;
                let printable = !name.is_empty() && name.iter().all(|b| b.is_ascii_graphic());
                if !printable || used == 0 || used % PAGE as u64 != 0 || sum + used > addr {
                    return Some(Step::Pass(Some("the RAM setup record has fields page-aware mode does not read (postcopy or x-ignore-shared?)".into())));
                }
                sum += used;
                blocks.push((name.to_vec(), used / PAGE as u64));
            }
            self.blocks.clone_from(&blocks);
            let blocks = blocks.into_iter().map(|(n, p)| (String::from_utf8_lossy(&n).into_owned(), p)).collect();
            return Some(Step::Item(Item::Blocks { n: c.at, blocks }));
        }
        if kind == F_EOS {
            self.state = State::Top;
            return Some(Step::Item(Item::Opaque(c.at)));
        }
        if kind != F_PAGE && kind != F_ZERO {
            return Some(Step::Pass(Some(format!("RAM record flags {} are not handled (an xbzrle or compression capability?)", flag_names(flags)))));
        }
        let block = match self.block_of(c, flags)? {
            Ok(b) => b,
            Err(why) => return Some(Step::Pass(Some(why))),
        };
        let index = addr / PAGE as u64;
        if index >= self.blocks[block as usize].1 {
            return Some(Step::Pass(Some(format!("page at {addr:#x} beyond its RAM block"))));
        }
        if kind == F_ZERO {
            let fill = c.u8()?;
            return Some(Step::Item(Item::Zero { n: c.at, flags, block, index, fill }));
        }
        c.take(PAGE)?;
        Some(Step::Item(Item::Page { n: c.at, flags, block, index }))
    }
}

// ---------------------------------------------------------------- encoder

/// What the encoder did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EncodeReport {
    /// Bytes of QEMU's stream read.
    pub input: u64,
    /// Encoded bytes written.
    pub output: u64,
    /// Page records of QEMU's stream (pages with data).
    pub pages: u64,
    /// Zero-page records.
    pub zero_pages: u64,
    /// HDE's classification of the page records.
    pub hde: EncodeStats,
    /// Page records sent again (a later round) and the share of them whose old copy the cache held.
    pub resent_pages: u64,
    /// See `resent_pages`.
    pub cache_hits: u64,
    /// Batches.
    pub batches: u64,
    /// Batches per effort (`off`, `zstd-1`, ...).
    pub levels: std::collections::BTreeMap<String, u64>,
    /// Bytes passed through without page awareness (device state, or all after a fallback).
    pub passthrough: u64,
    /// Why the parser fell back to passthrough before the RAM part ended, if it did.
    pub fallback: Option<String>,
}

/// The sender's side: QEMU's stream in, the encoded stream out.
pub struct Encoder {
    parser: Parser,
    /// Input not parsed yet, from `pos`.
    buf: Vec<u8>,
    pos: usize,
    /// `None` while page-aware; `Some(reason)` once passing through.
    pass: Option<Option<String>>,
    hde: hde::Encoder,
    /// zstd for the skeleton and the carried bytes, one context for the stream (a context per
    /// call cost a `ZSTD_createCCtx` and its tables each batch), at the level it was last set to.
    carried: (zstd::bulk::Compressor<'static>, i32),
    /// Pages as last sent, for deltas (bounded, FIFO).
    cache: hde::PageCache,
    /// Every page sent so far (to count re-sends).
    seen: HashSet<u64>,
    /// First global page number of each block.
    bases: Vec<u64>,
    /// zstd level of the pages (`None`: zero, duplicate, same and XBZRLE pages only), and of
    /// the skeletons and carried bytes (level 1 for `None`).
    level: Option<i32>,
    // The open batch.
    skel: Vec<u8>,
    pages: Vec<(u64, Vec<u8>)>,
    in_batch: HashSet<u64>,
    opaque_in_batch: usize,
    batch_sum: Xxh3,
    batch_len: usize,
    whole: Xxh3,
    out: Vec<u8>,
    report: EncodeReport,
    ended: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "qemu::Encoder {{ pass: {:?}, input: {} }}", self.pass, self.report.input)
    }
}

/// A LEB128 number at `*at` (HDE's encoding), moving `at` past it.
fn get_leb(b: &[u8], at: &mut usize) -> Option<u64> {
    let (v, rest) = hde::get_leb(b.get(*at..)?)?;
    *at = b.len() - rest.len();
    Some(v)
}

/// A skeleton item of a page record (1) or a zero-page record (2): `kind flags block index`.
fn page_item(skel: &mut Vec<u8>, kind: u8, flags: u64, block: u32, index: u64) {
    skel.push(kind);
    put_leb(skel, flags);
    put_leb(skel, u64::from(block));
    put_leb(skel, index);
}

fn record(out: &mut Vec<u8>, tag: u8, body: &[&[u8]]) {
    let len: usize = body.iter().map(|b| b.len()).sum();
    out.push(tag);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    for b in body {
        out.extend_from_slice(b);
    }
}

impl Encoder {
    /// An encoder with zstd at `level` (`None`: no zstd on pages, see [`Encoder::set_level`])
    /// and a cache of at most `cache_bytes` of old pages.
    pub fn new(level: Option<i32>, cache_bytes: u64) -> std::io::Result<Self> {
        let mut out = Vec::new();
        record(&mut out, b'H', &[MAGIC]);
        let mut hde = hde::Encoder::new(level.unwrap_or(3), None)?;
        hde.set_level(level)?;
        Ok(Self {
            parser: Parser::new(),
            buf: Vec::new(),
            pos: 0,
            pass: None,
            hde,
            carried: (zstd::bulk::Compressor::new(level.unwrap_or(1))?, level.unwrap_or(1)),
            cache: hde::PageCache::new(cache_bytes),
            seen: HashSet::new(),
            bases: Vec::new(),
            level,
            skel: Vec::new(),
            pages: Vec::new(),
            in_batch: HashSet::new(),
            opaque_in_batch: 0,
            batch_sum: Xxh3::new(),
            batch_len: 0,
            whole: Xxh3::new(),
            out,
            report: EncodeReport::default(),
            ended: false,
        })
    }

    /// Begins a new stream at the effort in force, forgetting everything of the last one but
    /// its zstd contexts (whose tables cost more to build than a short stream to encode).
    pub fn restart(&mut self) {
        self.parser = Parser::new();
        self.buf.clear();
        self.pos = 0;
        self.pass = None;
        self.hde.reset();
        self.cache.clear();
        self.seen.clear();
        self.bases.clear();
        self.skel.clear();
        self.pages.clear();
        self.in_batch.clear();
        self.opaque_in_batch = 0;
        self.batch_sum = Xxh3::new();
        self.batch_len = 0;
        self.whole = Xxh3::new();
        self.out.clear();
        record(&mut self.out, b'H', &[MAGIC]);
        self.report = EncodeReport::default();
        self.ended = false;
    }

    /// Sets the effort from the next batch on: a zstd level, or `None` for no zstd on pages
    /// (the skeleton and carried bytes then take level 1).
    pub fn set_level(&mut self, level: Option<i32>) -> std::io::Result<()> {
        self.hde.set_level(level)?;
        self.level = level;
        Ok(())
    }

    /// The level of the skeletons and carried bytes.
    fn carried_level(&self) -> i32 {
        self.level.unwrap_or(1)
    }

    /// `b` through the stream's zstd context at the carried level.
    fn squeeze(&mut self, b: &[u8]) -> std::io::Result<Vec<u8>> {
        let level = self.carried_level();
        if self.carried.1 != level {
            self.carried.0.set_compression_level(level)?;
            self.carried.1 = level;
        }
        self.carried.0.compress(b)
    }

    /// What was done so far.
    pub fn report(&self) -> &EncodeReport {
        &self.report
    }

    /// Takes the encoded bytes ready so far.
    pub fn take(&mut self) -> Vec<u8> {
        let o = std::mem::take(&mut self.out);
        self.report.output += o.len() as u64;
        o
    }

    /// Feeds QEMU's bytes.
    pub fn push(&mut self, input: &[u8]) {
        assert!(!self.ended, "push after finish");
        self.report.input += input.len() as u64;
        self.whole.update(input);
        if self.pass.is_some() {
            self.passthrough(input);
            return;
        }
        self.buf.extend_from_slice(input);
        loop {
            match self.parser.step(&self.buf[self.pos..]) {
                Step::Need => break,
                Step::Item(it) => self.item(it),
                Step::Pass(why) => {
                    self.flush();
                    if let Some(w) = &why {
                        record(&mut self.out, b'P', &[w.as_bytes()]);
                        self.report.fallback = Some(w.clone());
                    }
                    self.pass = Some(why);
                    let rest = self.buf.split_off(self.pos);
                    self.buf = Vec::new();
                    self.pos = 0;
                    self.passthrough(&rest);
                    return;
                }
            }
        }
        // Keep the unparsed tail at the front.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn passthrough(&mut self, b: &[u8]) {
        self.report.passthrough += b.len() as u64;
        for b in b.chunks(MAX_RAW) {
            let sum = xxh3_64(b).to_le_bytes();
            match self.squeeze(b) {
                Ok(z) if z.len() < b.len() => record(&mut self.out, b'R', &[&sum, &[1], &z]),
                _ => record(&mut self.out, b'R', &[&sum, &[0], b]),
            }
        }
    }

    fn item(&mut self, it: Item) {
        let start = self.pos;
        let (n, page) = match &it {
            Item::Opaque(n) | Item::Blocks { n, .. } => (*n, None),
            Item::Page { n, block, index, .. } | Item::Zero { n, block, index, .. } => (*n, Some(self.bases[*block as usize] + index)),
        };
        // A page twice in one batch would be decoded before its first record is rebuilt.
        if let Some(no) = page
            && self.in_batch.contains(&no)
        {
            self.flush();
        }
        let bytes = &self.buf[start..start + n];
        self.batch_sum.update(bytes);
        self.batch_len += n;
        match it {
            Item::Opaque(_) => {
                self.skel.push(0);
                put_leb(&mut self.skel, n as u64);
                self.skel.extend_from_slice(bytes);
                self.opaque_in_batch += n;
            }
            Item::Blocks { blocks, .. } => {
                // The setup record itself travels as opaque bytes, after the definitions.
                let mut base = 0;
                for (name, pages) in &blocks {
                    self.skel.push(3);
                    put_leb(&mut self.skel, name.len() as u64);
                    self.skel.extend_from_slice(name.as_bytes());
                    put_leb(&mut self.skel, *pages);
                    self.bases.push(base);
                    base += pages;
                }
                self.skel.push(0);
                put_leb(&mut self.skel, n as u64);
                self.skel.extend_from_slice(bytes);
            }
            Item::Page { flags, block, index, .. } => {
                page_item(&mut self.skel, 1, flags, block, index);
                let no = page.expect("page");
                self.pages.push((no, bytes[n - PAGE..].to_vec()));
                self.in_batch.insert(no);
                self.report.pages += 1;
            }
            Item::Zero { flags, block, index, fill, .. } => {
                page_item(&mut self.skel, 2, flags, block, index);
                self.skel.push(fill);
                let no = page.expect("page");
                self.pages.push((no, vec![fill; PAGE]));
                self.in_batch.insert(no);
                self.report.zero_pages += 1;
            }
        }
        self.pos += n;
        if self.pages.len() >= BATCH_PAGES || self.opaque_in_batch >= BATCH_OPAQUE {
            self.flush();
        }
    }

    /// Closes the open batch into a record (call when QEMU's input pauses, so nothing waits).
    pub fn flush(&mut self) {
        if self.skel.is_empty() {
            return;
        }
        let pages = std::mem::take(&mut self.pages);
        let mut st = EncodeStats::default();
        for (no, _) in &pages {
            if !self.seen.insert(*no) {
                self.report.resent_pages += 1;
                self.report.cache_hits += u64::from(self.cache.peek(*no).is_some());
            }
        }
        let frame = {
            let refs: Vec<(u64, &[u8])> = pages.iter().map(|(n, p)| (*n, &p[..])).collect();
            let cache = &self.cache;
            // The receiver decodes the batches in stream order, so every page it holds is what
            // the cache last took for it: any cached page may lead a delta block's prefix.
            self.hde.encode_with_refs(&refs, &|no| cache.peek(no), &|no| cache.peek(no), &mut st)
        };
        for (no, p) in &pages {
            if hde::is_zero(p) {
                self.cache.remove(*no);
            } else {
                self.cache.put(*no, p);
            }
        }
        for (k, v) in st.pages {
            *self.report.hde.pages.entry(k).or_default() += v;
        }
        self.report.hde.input += st.input;
        self.report.hde.output += st.output;
        let skel = std::mem::take(&mut self.skel);
        let packed = self.squeeze(&skel).expect("zstd compresses to a Vec");
        self.skel = skel;
        let skel = packed;
        *self.report.levels.entry(crate::control::effort::level_name(self.level)).or_default() += 1;
        let sum = std::mem::replace(&mut self.batch_sum, Xxh3::new()).digest();
        record(&mut self.out, b'F', &[&(self.batch_len as u32).to_le_bytes(), &sum.to_le_bytes(), &(skel.len() as u32).to_le_bytes(), &skel, &frame]);
        self.report.batches += 1;
        self.skel.clear();
        self.in_batch.clear();
        self.opaque_in_batch = 0;
        self.batch_len = 0;
    }

    /// The end of QEMU's stream: flushes and writes the end record. Bytes QEMU wrote that do
    /// not form a whole record (a stream cut short) are carried as passthrough, so the
    /// destination sees exactly what the source wrote.
    pub fn finish(&mut self) {
        if self.ended {
            return;
        }
        self.flush();
        if self.pass.is_none() {
            let rest = self.buf.split_off(self.pos);
            self.passthrough(&rest);
        }
        let total = self.report.input;
        let h = self.whole.digest128();
        record(&mut self.out, b'E', &[&total.to_le_bytes(), &h.to_le_bytes()]);
        self.ended = true;
    }
}

// ---------------------------------------------------------------- decoder

/// A damaged or unexpected encoded stream. Nothing of the record named was released.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QemuError {
    /// The stream does not start with the page-aware header.
    #[error("not a page-aware migration stream (no DWQ1 header)")]
    NotPageAware,
    /// A record is malformed.
    #[error("page-aware record {record} ({tag:?}) is malformed: {why}")]
    Malformed {
        /// Record number.
        record: u64,
        /// Its tag.
        tag: char,
        /// What.
        why: String,
    },
    /// A page did not decode or verify.
    #[error("page-aware record {record}: page {page} of RAM block {block:?} did not verify ({why}); nothing of it was passed to QEMU")]
    Page {
        /// Record number.
        record: u64,
        /// Block name.
        block: String,
        /// Page index in the block.
        page: u64,
        /// Why.
        why: String,
    },
    /// The rebuilt bytes of a record differ from what the source QEMU wrote.
    #[error("page-aware record {record}: the rebuilt stream differs from the source's ({what}); nothing of it was passed to QEMU")]
    Mismatch {
        /// Record number.
        record: u64,
        /// What differs.
        what: &'static str,
    },
    /// The stream ended without its end record.
    #[error("the page-aware stream ended without its end record (the source stopped mid-stream)")]
    Unfinished,
}

/// One item of a batch's skeleton, as the decoder reads it.
enum SkelItem {
    /// Bytes carried as they are: this range of the skeleton.
    Bytes(std::ops::Range<usize>),
    /// A page record (its page from the receiver's copy) or, with `fill`, a zero-page record.
    Page { flags: u64, block: usize, index: u64, fill: Option<u8> },
}

struct Block {
    name: String,
    base: u64,
    pages: u64,
    map: memmap2::MmapMut,
}

/// The receiver's copy of the guest's RAM, one anonymous mapping per block (untouched pages
/// cost nothing and read as zero, as the destination's RAM does).
#[derive(Default)]
struct Ram {
    blocks: Vec<Block>,
}

impl Ram {
    fn locate(&self, no: u64) -> Option<(usize, usize)> {
        let i = self.blocks.partition_point(|b| b.base <= no).checked_sub(1)?;
        let b = &self.blocks[i];
        let off = no.checked_sub(b.base).filter(|&o| o < b.pages)?;
        Some((i, off as usize * PAGE))
    }
}

impl PageStore for Ram {
    fn get(&self, no: u64) -> Option<&[u8]> {
        let (i, at) = self.locate(no)?;
        Some(&self.blocks[i].map[at..at + PAGE])
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        if let Some((i, at)) = self.locate(no) {
            self.blocks[i].map[at..at + PAGE].copy_from_slice(page);
        }
    }
}

/// What the decoder did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecodeReport {
    /// Bytes rebuilt (QEMU's stream).
    pub output: u64,
    /// Pages applied.
    pub pages: u64,
    /// The source's fallback reason, if it fell back to passthrough.
    pub fallback: Option<String>,
    /// The guest RAM the receiver's copy spans (bytes mapped, not all resident).
    pub ram_bytes: u64,
}

/// The receiver's side: the encoded stream in, QEMU's exact stream out.
pub struct Decoder {
    buf: Vec<u8>,
    started: bool,
    ended: bool,
    records: u64,
    ram: Ram,
    /// The most guest RAM this decoder maps for its copy.
    ram_limit: u64,
    hde: hde::Decoder,
    whole: Xxh3,
    report: DecodeReport,
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "qemu::Decoder {{ records: {}, report: {:?} }}", self.records, self.report)
    }
}

impl Decoder {
    /// A decoder whose copy of the guest's RAM may span at most the host's physical memory (the
    /// destination QEMU needs as much, so a stream that defines more is not a guest this host
    /// can run).
    pub fn new() -> std::io::Result<Self> {
        Self::with_ram_limit(crate::sys::physical_memory().unwrap_or(1 << 40))
    }

    /// A decoder whose copy of the guest's RAM may span at most `ram_limit` bytes.
    pub fn with_ram_limit(ram_limit: u64) -> std::io::Result<Self> {
        Ok(Self {
            buf: Vec::new(),
            started: false,
            ended: false,
            records: 0,
            ram: Ram::default(),
            ram_limit,
            hde: hde::Decoder::new(None)?,
            whole: Xxh3::new(),
            report: DecodeReport::default(),
            zstd: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Begins a new stream under the same RAM limit, keeping its zstd context.
    pub fn restart(&mut self) {
        self.buf.clear();
        self.started = false;
        self.ended = false;
        self.records = 0;
        self.ram = Ram::default();
        self.whole = Xxh3::new();
        self.report = DecodeReport::default();
    }

    /// What was done so far.
    pub fn report(&self) -> &DecodeReport {
        &self.report
    }

    /// Whether the end record arrived and verified.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Feeds encoded bytes; appends the verified bytes of every complete record to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), QemuError> {
        self.buf.extend_from_slice(input);
        // Records are decoded in place; the buffer is put back with what is left of it.
        let buf = std::mem::take(&mut self.buf);
        let mut at = 0;
        let r = loop {
            let Some(hdr) = buf.get(at..at + 5) else { break Ok(()) };
            let (tag, len) = (hdr[0], u32::from_le_bytes(hdr[1..5].try_into().expect("4")) as usize);
            if !self.started && (tag != b'H' || len != MAGIC.len()) {
                break Err(QemuError::NotPageAware);
            }
            if len > MAX_RECORD {
                break Err(QemuError::Malformed { record: self.records, tag: tag as char, why: format!("{len} bytes long, more than any record can be") });
            }
            let Some(body) = buf.get(at + 5..at + 5 + len) else { break Ok(()) };
            at += 5 + len;
            if let Err(e) = self.record(tag, body, out) {
                break Err(e);
            }
        };
        self.buf = buf;
        self.buf.drain(..at);
        r
    }

    /// Checks the stream ended with its end record.
    pub fn finish(&self) -> Result<&DecodeReport, QemuError> {
        if self.ended { Ok(&self.report) } else { Err(QemuError::Unfinished) }
    }

    fn record(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<(), QemuError> {
        let record = self.records;
        self.records += 1;
        let bad = |why: &str| QemuError::Malformed { record, tag: tag as char, why: why.into() };
        if !self.started {
            if tag != b'H' || body != MAGIC {
                return Err(QemuError::NotPageAware);
            }
            self.started = true;
            return Ok(());
        }
        if self.ended {
            return Err(bad("a record after the end record"));
        }
        match tag {
            b'P' => {
                let why = String::from_utf8_lossy(body).into_owned();
                tracing::warn!("the source's page-aware parser fell back to passthrough (tunnel mode for the rest of the stream): {why}");
                self.report.fallback = Some(why);
                Ok(())
            }
            b'R' => {
                if body.len() < 9 {
                    return Err(bad("shorter than its header"));
                }
                let sum = u64::from_le_bytes(body[..8].try_into().expect("8"));
                let data = match body[8] {
                    0 => body[9..].to_vec(),
                    1 => self.zstd.decompress(&body[9..], MAX_RAW).map_err(|_| bad("zstd data does not decode"))?,
                    _ => return Err(bad("unknown encoding")),
                };
                if xxh3_64(&data) != sum {
                    return Err(QemuError::Mismatch { record, what: "passthrough bytes" });
                }
                self.release(&data, out);
                Ok(())
            }
            b'F' => self.batch(record, body, out),
            b'E' => {
                if body.len() != 24 {
                    return Err(bad("wrong length"));
                }
                let total = u64::from_le_bytes(body[..8].try_into().expect("8"));
                let h = u128::from_le_bytes(body[8..].try_into().expect("16"));
                if total != self.report.output {
                    return Err(QemuError::Mismatch { record, what: "stream length" });
                }
                if h != self.whole.digest128() {
                    return Err(QemuError::Mismatch { record, what: "whole-stream XXH3-128" });
                }
                self.ended = true;
                Ok(())
            }
            _ => Err(bad("unknown record type")),
        }
    }

    fn release(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.whole.update(data);
        self.report.output += data.len() as u64;
        out.extend_from_slice(data);
    }

    fn batch(&mut self, record: u64, body: &[u8], out: &mut Vec<u8>) -> Result<(), QemuError> {
        let bad = |why: &str| QemuError::Malformed { record, tag: 'F', why: why.into() };
        if body.len() < 16 {
            return Err(bad("shorter than its header"));
        }
        let out_len = u32::from_le_bytes(body[..4].try_into().expect("4")) as usize;
        if out_len > BATCH_OUT_MAX {
            return Err(bad(&format!("declares {out_len} bytes, more than a batch can rebuild")));
        }
        let sum = u64::from_le_bytes(body[4..12].try_into().expect("8"));
        let skel_len = u32::from_le_bytes(body[12..16].try_into().expect("4")) as usize;
        let skel_z = body.get(16..16 + skel_len).ok_or_else(|| bad("skeleton runs past the record"))?;
        let frame = &body[16 + skel_len..];
        // Bounded: a skeleton is at most its batch's bytes plus the item headers.
        let skel = self.zstd.decompress(skel_z, out_len + 64 * BATCH_PAGES + 4096).map_err(|_| bad("skeleton does not decode"))?;
        // Block definitions come first in their batch; the pages may refer to them.
        let mut at = 0;
        let mut items: Vec<SkelItem> = Vec::new();
        while at < skel.len() {
            let t = skel[at];
            at += 1;
            let mut leb = || get_leb(&skel, &mut at).ok_or_else(|| bad("skeleton truncated"));
            match t {
                0 => {
                    let n = leb()? as usize;
                    let end = at.checked_add(n).filter(|&e| e <= skel.len()).ok_or_else(|| bad("opaque bytes run past the skeleton"))?;
                    items.push(SkelItem::Bytes(at..end));
                    at = end;
                }
                1 | 2 => {
                    let (flags, block, index) = (leb()?, leb()?, leb()?);
                    let fill = if t == 2 {
                        let f = *skel.get(at).ok_or_else(|| bad("skeleton truncated"))?;
                        at += 1;
                        Some(f)
                    } else {
                        None
                    };
                    let b = self.ram.blocks.get(block as usize).ok_or_else(|| bad("page of an undefined RAM block"))?;
                    if index >= b.pages || flags & !FLAG_MASK != 0 {
                        return Err(bad("page outside its RAM block"));
                    }
                    items.push(SkelItem::Page { flags, block: block as usize, index, fill });
                }
                3 => {
                    let n = leb()? as usize;
                    let end = at.checked_add(n).filter(|&e| e <= skel.len()).ok_or_else(|| bad("skeleton truncated"))?;
                    let name = String::from_utf8_lossy(&skel[at..end]).into_owned();
                    at = end;
                    let pages = get_leb(&skel, &mut at).ok_or_else(|| bad("skeleton truncated"))?;
                    if pages == 0 || pages > (1 << 36) {
                        return Err(bad("RAM block size out of range"));
                    }
                    if self.ram.blocks.len() >= BLOCKS_MAX {
                        return Err(bad(&format!("more than {BLOCKS_MAX} RAM blocks")));
                    }
                    if self.report.ram_bytes.saturating_add(pages * PAGE as u64) > self.ram_limit {
                        return Err(bad(&format!("RAM blocks of more than {} bytes, this receiver's limit (its physical memory)", self.ram_limit)));
                    }
                    let map = memmap2::MmapOptions::new().len(pages as usize * PAGE).map_anon().map_err(|e| bad(&format!("mapping {pages} pages for RAM block {name}: {e}")))?;
                    let base = self.ram.blocks.last().map_or(0, |b| b.base + b.pages);
                    self.report.ram_bytes += pages * PAGE as u64;
                    self.ram.blocks.push(Block { name, base, pages, map });
                }
                _ => return Err(bad("unknown skeleton item")),
            }
        }
        // Pages first (HDE checks each against its checksum), then the bytes in stream order.
        let rep = self.hde.decode_bounded(frame, &mut self.ram, BATCH_PAGES).map_err(|e| bad(&e.to_string()))?;
        let name_of = |ram: &Ram, no: u64| ram.locate(no).map_or((String::from("?"), no), |(i, at)| (ram.blocks[i].name.clone(), (at / PAGE) as u64));
        if let Some(&(no, why)) = rep.rejected.first() {
            let (block, page) = name_of(&self.ram, no);
            return Err(QemuError::Page { record, block, page, why: why.into() });
        }
        if let Some(d) = rep.deferred.first() {
            let (block, page) = name_of(&self.ram, d.no);
            return Err(QemuError::Page { record, block, page, why: "duplicate of a page that does not hold what the source said".into() });
        }
        // Rebuilt at the end of `out`, and taken back unless it verifies.
        let start = out.len();
        out.reserve(out_len);
        for item in items {
            match item {
                SkelItem::Bytes(r) => out.extend_from_slice(&skel[r]),
                SkelItem::Page { flags, block, index, fill } => {
                    let blk = &self.ram.blocks[block];
                    out.extend_from_slice(&((index * PAGE as u64) | flags).to_be_bytes());
                    if flags & F_CONTINUE == 0 {
                        out.push(blk.name.len() as u8);
                        out.extend_from_slice(blk.name.as_bytes());
                    }
                    match fill {
                        Some(f) => out.push(f),
                        None => {
                            let at = index as usize * PAGE;
                            out.extend_from_slice(&blk.map[at..at + PAGE]);
                        }
                    }
                    self.report.pages += 1;
                }
            }
        }
        let rebuilt = &out[start..];
        let verdict = if rebuilt.len() != out_len {
            Err(QemuError::Mismatch { record, what: "batch length" })
        } else if xxh3_64(rebuilt) != sum {
            Err(QemuError::Mismatch { record, what: "batch XXH3" })
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                self.whole.update(rebuilt);
                self.report.output += rebuilt.len() as u64;
            }
            Err(_) => out.truncate(start),
        }
        verdict
    }
}

#[cfg(test)]
mod tests;

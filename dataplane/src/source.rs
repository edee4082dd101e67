//! What a sender reads from: a memory-mapped file, an ordered stream (standard input, or a Unix
//! socket a producer such as QEMU connects to), or a generated VM-like image.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use xxhash_rust::xxh3::xxh3_64;

/// Page size the generator works in.
pub const PAGE: usize = 4096;

/// Where an ordered stream is read from.
#[derive(Debug, Clone)]
pub enum Input {
    /// Standard input.
    Stdin,
    /// The one connection accepted on a Unix socket (`unix:PATH`): QEMU's `migrate unix:PATH`,
    /// or libvirt's `--migrateuri unix://PATH`.
    Socket(Arc<UnixStream>),
}

impl Input {
    /// What it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Input::Stdin => "standard input".into(),
            Input::Socket(s) => match s.local_addr().ok().and_then(|a| a.as_pathname().map(|p| p.display().to_string())) {
                Some(p) => format!("the connection on unix:{p}"),
                None => "the Unix socket connection".into(),
            },
        }
    }
}

/// Binds a Unix socket at `path` and accepts one connection on it; the socket file is removed
/// once it is accepted (nobody else can join the stream). A stale socket left at `path` is
/// replaced; any other file there is refused.
pub fn accept_unix(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, format!("{} exists and is not a socket", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    tracing::info!(path = %path.display(), "waiting for the stream's producer to connect");
    let accepted = l.accept();
    let _ = std::fs::remove_file(path);
    Ok(accepted?.0)
}

/// A sender's source of bytes.
#[derive(Debug)]
pub enum Source {
    /// A regular file, mapped read-only.
    File {
        /// The mapping (None for an empty file).
        map: Option<Arc<Mmap>>,
        /// Size in bytes.
        size: u64,
        /// Object name (file name).
        name: String,
        /// Identity: hash of name, size, mtime and inode.
        id: u64,
    },
    /// An ordered byte stream of unknown size.
    Stream {
        /// Object name.
        name: String,
        /// Where it is read from.
        input: Input,
    },
    /// A deterministic VM-like image (zero, duplicate, text-like and random pages).
    Generated {
        /// Size in bytes.
        size: u64,
        /// Seed.
        seed: u64,
        /// Object name.
        name: String,
    },
}

impl Source {
    /// Maps a file.
    pub fn file(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let f = File::open(path)?;
        let md = f.metadata()?;
        if !md.is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a regular file", path.display())));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "object".into());
        let size = md.len();
        let map = if size == 0 {
            None
        } else {
            let m = crate::sys::map_readonly(&f)?;
            let _ = m.advise(memmap2::Advice::Sequential);
            Some(Arc::new(m))
        };
        let id = xxh3_64(format!("{name}|{size}|{}|{}|{}", md.mtime(), md.mtime_nsec(), md.ino()).as_bytes());
        Ok(Source::File { map, size, name, id })
    }

    /// Size if known.
    pub fn size(&self) -> Option<u64> {
        match self {
            Source::File { size, .. } | Source::Generated { size, .. } => Some(*size),
            Source::Stream { .. } => None,
        }
    }
    /// Object name.
    pub fn name(&self) -> &str {
        match self {
            Source::File { name, .. } | Source::Stream { name, .. } | Source::Generated { name, .. } => name,
        }
    }
    /// Identity for resume.
    pub fn object_id(&self) -> u64 {
        match self {
            Source::File { id, .. } => *id,
            Source::Generated { size, seed, .. } => xxh3_64(format!("gen|{size}|{seed}").as_bytes()),
            Source::Stream { .. } => {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).expect("OS random source");
                u64::from_le_bytes(b)
            }
        }
    }
    /// Whether chunks can be read again by offset (needed for `--resume`).
    pub fn seekable(&self) -> bool {
        !matches!(self, Source::Stream { .. })
    }
    /// Copies (file) or generates the bytes at `offset` into `out`.
    pub fn fill(&self, offset: u64, out: &mut [u8]) {
        match self {
            Source::File { map: Some(m), .. } => out.copy_from_slice(&m[offset as usize..offset as usize + out.len()]),
            Source::File { map: None, .. } => assert!(out.is_empty(), "read past end of empty file"),
            Source::Generated { seed, .. } => generate(*seed, offset, out),
            Source::Stream { .. } => panic!("stream chunks carry their own bytes"),
        }
    }
    /// XXH3-64 of `len` bytes at `offset`.
    pub fn checksum(&self, offset: u64, len: u32) -> u64 {
        match self {
            Source::File { map: Some(m), .. } => xxh3_64(&m[offset as usize..offset as usize + len as usize]),
            _ => {
                let mut v = vec![0u8; len as usize];
                self.fill(offset, &mut v);
                xxh3_64(&v)
            }
        }
    }
}

#[inline]
fn wyrand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0xa076_1d64_78bd_642f);
    let t = u128::from(*state) * u128::from(*state ^ 0xe703_7ed1_a0b4_28db);
    ((t >> 64) ^ t) as u64
}

const WORDS: &[&[u8]] = &[
    b"the ",
    b"kernel ",
    b"page ",
    b"cache ",
    b"struct ",
    b"return ",
    b"0x0000 ",
    b"error ",
    b"{\"id\": ",
    b"GET /index.html ",
    b"ssh-rsa ",
    b"\n",
    b"libc.so.6 ",
    b"INFO ",
    b"migration ",
    b"    ",
];

/// 64 KiB of text-like bytes (words from a small vocabulary in random order); a text page of the
/// image is a 4 KiB window of it at a random offset.
fn text_corpus() -> &'static [u8] {
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut s = 0x1234_5678u64;
        let mut v = Vec::with_capacity(64 * 1024 + PAGE);
        while v.len() < 64 * 1024 + PAGE {
            v.extend_from_slice(WORDS[(wyrand(&mut s) % WORDS.len() as u64) as usize]);
        }
        v
    })
}

std::thread_local! {
    /// The 16 template pages of the last seed used on this thread.
    static TEMPLATES: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
}

/// Fills one page of the generated image: about 35% zero pages, 15% copies of one of 16 template
/// pages, 25% text-like pages and 25% random (incompressible) pages, chosen by a hash of the page
/// number, so any byte range can be regenerated independently and in parallel.
fn gen_page(seed: u64, page: u64, out: &mut [u8; PAGE]) {
    let mut s = seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let class = wyrand(&mut s) % 100;
    match class {
        0..35 => out.fill(0),
        35..50 => {
            let t = (wyrand(&mut s) % 16) as usize;
            TEMPLATES.with_borrow_mut(|(tseed, pages)| {
                if *tseed != seed {
                    pages.resize(16 * PAGE, 0);
                    for (i, p) in pages.chunks_exact_mut(PAGE).enumerate() {
                        let mut ts = seed ^ (i as u64).wrapping_mul(0x5851_f42d_4c95_7f2d);
                        fill_random(&mut ts, p);
                    }
                    *tseed = seed;
                }
                out.copy_from_slice(&pages[t * PAGE..(t + 1) * PAGE]);
            });
        }
        50..75 => {
            let at = (wyrand(&mut s) % (64 * 1024)) as usize;
            out.copy_from_slice(&text_corpus()[at..at + PAGE]);
        }
        _ => fill_random(&mut s, out),
    }
}

/// Four independent wyrand lanes, so the multiplies overlap.
fn fill_random(s: &mut u64, out: &mut [u8]) {
    let mut l = [*s, *s ^ 0x1111_1111_1111_1111, *s ^ 0x2222_2222_2222_2222, *s ^ 0x3333_3333_3333_3333];
    for c in out.chunks_exact_mut(32) {
        for (k, lane) in l.iter_mut().enumerate() {
            c[k * 8..k * 8 + 8].copy_from_slice(&wyrand(lane).to_le_bytes());
        }
    }
    *s = l[0];
}

/// Generates the bytes of the VM-like image with `seed` at `offset` into `out`.
pub fn generate(seed: u64, offset: u64, out: &mut [u8]) {
    let mut page = offset / PAGE as u64;
    let mut skip = (offset % PAGE as u64) as usize;
    let mut at = 0;
    let mut scratch = [0u8; PAGE];
    while at < out.len() {
        let n = (PAGE - skip).min(out.len() - at);
        if skip == 0 && n == PAGE {
            let dst: &mut [u8; PAGE] = (&mut out[at..at + PAGE]).try_into().expect("page");
            gen_page(seed, page, dst);
        } else {
            gen_page(seed, page, &mut scratch);
            out[at..at + n].copy_from_slice(&scratch[skip..skip + n]);
        }
        at += n;
        skip = 0;
        page += 1;
    }
}

/// The file at `path` mapped read-only: a delta round's previous image (`--round-of`), under
/// the same rules as a file source (it must not be truncated while it is sent).
pub fn map_image(path: &Path) -> std::io::Result<Mmap> {
    crate::sys::map_readonly(&File::open(path)?)
}

/// Parses `123`, `4k`, `1M`, `2GiB`, `1.5G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (examples: 4096, 64k, 1MiB, 2GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?} (use k, M, G or T)")),
    };
    Ok((n * mult as f64) as u64)
}

/// The source a caller names: `-` (standard input), `unix:PATH` (the stream of the one producer
/// that connects to a Unix socket bound at PATH: this waits for it), `gen:SIZE[:SEED]` (a
/// generated VM-like image) or a file; `name` is the name at the receiver (default: the file's
/// name, `stdin`, `stream` or `generated.img`).
pub fn parse(spec: &str, name: Option<String>) -> Result<Source, String> {
    if spec == "-" {
        return Ok(Source::Stream { name: name.unwrap_or_else(|| "stdin".into()), input: Input::Stdin });
    }
    if let Some(path) = spec.strip_prefix("unix:") {
        let path = Path::new(path.strip_prefix("//").unwrap_or(path));
        let conn = accept_unix(path).map_err(|e| format!("cannot take a stream on unix:{}: {e}", path.display()))?;
        return Ok(Source::Stream { name: name.unwrap_or_else(|| "stream".into()), input: Input::Socket(Arc::new(conn)) });
    }
    if let Some(g) = spec.strip_prefix("gen:") {
        let (size, seed) = match g.split_once(':') {
            Some((s, seed)) => (s, seed.parse::<u64>().map_err(|_| "the seed in gen:SIZE:SEED must be a number".to_string())?),
            None => (g, 1),
        };
        return Ok(Source::Generated { size: parse_size(size)?, seed, name: name.unwrap_or_else(|| "generated.img".into()) });
    }
    let mut s = Source::file(Path::new(spec)).map_err(|e| format!("cannot read source {spec}: {e}"))?;
    if let (Some(n), Source::File { name, .. }) = (name, &mut s) {
        *name = n;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_position_independent() {
        let mut whole = vec![0u8; 5 * PAGE];
        generate(7, 0, &mut whole);
        let mut part = vec![0u8; 2 * PAGE + 100];
        generate(7, 1000, &mut part);
        assert_eq!(&whole[1000..1000 + part.len()], &part[..]);
        let zeros = whole.chunks(PAGE).filter(|p| p.iter().all(|b| *b == 0)).count();
        assert!(zeros < 5, "not all pages zero");
    }
}

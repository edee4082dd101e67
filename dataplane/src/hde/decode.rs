//! The receiver's side: HDE frames into pages, each checked before it is written.

use super::*;

/// A duplicate that did not verify yet: its source may be a page of the same round whose
/// frame has not arrived. Retry with [`Decoder::retry`] once the round's frames are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferred {
    /// Page.
    pub no: u64,
    /// Source page.
    pub src: u64,
    /// Expected checksum.
    pub sum: u64,
}

/// What a decode did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecodeReport {
    /// Pages written.
    pub applied: u64,
    /// Pages refused (did not decode, or did not match their checksum): re-send them literal.
    pub rejected: Vec<(u64, &'static str)>,
    /// Duplicates to retry at the end of the round.
    pub deferred: Vec<Deferred>,
}

/// The receiver's side.
pub struct Decoder {
    literal: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

/// One entry of a parsed frame.
pub(super) struct Parsed<'f> {
    pub(super) no: u64,
    pub(super) kind: Option<Kind>,
    pub(super) sum: u64,
    pub(super) inline: &'f [u8],
}

/// A parsed frame: its reference pages, entries, literal block and delta block.
pub(super) type Frame<'f> = (Vec<u64>, Vec<Parsed<'f>>, &'f [u8], &'f [u8]);

pub(super) fn parse(frame: &[u8], max_pages: usize) -> Result<Frame<'_>, HdeError> {
    if frame.len() < HEADER || &frame[..4] != MAGIC {
        return Err(HdeError::BadMagic);
    }
    let u32_at = |at: usize| u32::from_le_bytes(frame[at..at + 4].try_into().expect("4")) as usize;
    let (count, lit_len, delta_len, nrefs) = (u32_at(4), u32_at(8), u32_at(12), u32_at(16));
    if nrefs > REFS_MAX {
        return Err(HdeError::TooManyRefs { count: nrefs as u32 });
    }
    if count > PAGES_MAX.min(max_pages) {
        return Err(HdeError::TooManyPages { count: count as u32 });
    }
    let mut d = &frame[HEADER..];
    let mut prev: Option<u64> = None;
    let mut refs = Vec::with_capacity(nrefs.min(REFS_MAX));
    for _ in 0..nrefs {
        let (step, r) = get_leb(d).ok_or(HdeError::Truncated { index: 0 })?;
        refs.push(take_step(&mut prev, step));
        d = r;
    }
    let mut prev: Option<u64> = None;
    let mut out = Vec::with_capacity(count.min(1 << 16));
    while out.len() < count {
        let t = HdeError::Truncated { index: out.len() as u32 };
        let (step, r) = get_leb(d).ok_or(t.clone())?;
        let no = take_step(&mut prev, step);
        let (&k, r) = r.split_first().ok_or(t.clone())?;
        if k & RUN != 0 {
            // A run of zero or same pages: `more` after this one, numbered one after the other,
            // within the frame's count.
            let kind = Kind::from_u8(k & !RUN).filter(|k| k.bare());
            let (more, r) = get_leb(r).ok_or(t.clone())?;
            let more = usize::try_from(more).ok().filter(|&m| m >= 1 && m < count - out.len()).ok_or(t.clone())?;
            no.checked_add(more as u64).ok_or(t)?;
            out.extend((0..=more as u64).map(|k| Parsed { no: no + k, kind, sum: 0, inline: &r[..0] }));
            prev = Some(no + more as u64);
            d = r;
            continue;
        }
        let kind = Kind::from_u8(k);
        let (sum, r) = if kind.is_some_and(Kind::bare) {
            (0, r)
        } else {
            let s = r.get(..8).ok_or(t.clone())?;
            (u64::from_le_bytes(s.try_into().expect("8")), &r[8..])
        };
        let (inline, r) = if matches!(kind, Some(Kind::Dup | Kind::Xbzrle | Kind::Raw)) {
            let (n, r) = get_leb(r).ok_or(t.clone())?;
            let n = usize::try_from(n).ok().filter(|&n| n <= r.len()).ok_or(t.clone())?;
            (&r[..n], &r[n..])
        } else {
            (&r[..0], r)
        };
        d = r;
        out.push(Parsed { no, kind, sum, inline });
    }
    let listed = frame.len() - d.len();
    let (sum, d) = d.split_at_checked(8).ok_or(HdeError::Truncated { index: count as u32 })?;
    if d.len() != lit_len + delta_len {
        return Err(HdeError::Truncated { index: count as u32 });
    }
    if list_sum(&frame[..listed]) != u64::from_le_bytes(sum.try_into().expect("8")) {
        return Err(HdeError::Corrupt);
    }
    Ok((refs, out, &d[..lit_len], &d[lit_len..]))
}

impl Decoder {
    /// A decoder holding the sender's trained dictionary, if any.
    pub fn new(dict: Option<&[u8]>) -> std::io::Result<Self> {
        Ok(Self {
            literal: match dict {
                Some(d) => zstd::bulk::Decompressor::with_dictionary(d)?,
                None => zstd::bulk::Decompressor::new()?,
            },
        })
    }

    /// Decodes a frame into `store`. Every page is decoded into scratch and checked against its
    /// checksum before it is written; nothing of the frame is written before all of its delta
    /// pages are decoded (their old copies are the block's prefix).
    pub fn decode(&mut self, frame: &[u8], store: &mut dyn PageStore) -> Result<DecodeReport, HdeError> {
        self.decode_bounded(frame, store, PAGES_MAX)
    }

    /// [`Decoder::decode`] of a frame that may list at most `max_pages` pages (a chunk's): what
    /// it allocates (entries, decoded blocks, the report) is bounded by that, whatever the
    /// frame's header claims.
    pub fn decode_bounded(&mut self, frame: &[u8], store: &mut dyn PageStore, max_pages: usize) -> Result<DecodeReport, HdeError> {
        let (refs, entries, lit, delta) = parse(frame, max_pages)?;
        let mut rep = DecodeReport::default();
        let count = |k: Kind| entries.iter().filter(|e| e.kind == Some(k)).count();
        let (nlit, ndelta) = (count(Kind::Literal), count(Kind::ZstdDelta) + count(Kind::RefLiteral));
        let mut lit_pages = vec![0u8; nlit * PAGE];
        let lit_state: Result<(), &'static str> = if nlit == 0 {
            Ok(())
        } else {
            // A slice, not the Vec: zstd would set a Vec's length to what it wrote.
            match self.literal.decompress_to_buffer(lit, &mut lit_pages[..]) {
                Ok(n) if n == nlit * PAGE => Ok(()),
                Ok(_) => Err("literal block decodes to the wrong length"),
                Err(_) => Err("literal block does not decode"),
            }
        };
        let mut delta_pages = vec![0u8; ndelta * PAGE];
        let delta_state: Result<(), &'static str> = if ndelta == 0 {
            Ok(())
        } else {
            let mut prefix = Vec::with_capacity((refs.len() + ndelta) * PAGE);
            let mut missing = false;
            // The references, then the old copies of the block-delta pages (as the encoder).
            for no in refs.iter().copied().chain(entries.iter().filter(|e| e.kind == Some(Kind::ZstdDelta)).map(|e| e.no)) {
                match store.base(no) {
                    Some(p) => prefix.extend_from_slice(p),
                    None => missing = true,
                }
            }
            if missing {
                Err("delta against a page the receiver does not hold")
            } else {
                match decompress_with_prefix(&prefix, delta, &mut delta_pages) {
                    Ok(n) if n == ndelta * PAGE => Ok(()),
                    Ok(_) => Err("delta block decodes to the wrong length"),
                    Err(e) => Err(e),
                }
            }
        };
        // Blocks are decoded above, before any page is written (the delta prefix is the store as
        // it was); pages are then verified and written in order, so a duplicate may refer to a
        // page earlier in the same frame.
        let mut page = vec![0u8; PAGE];
        let (mut li, mut di) = (0, 0);
        for e in &entries {
            if !store.owns(e.no) {
                match e.kind {
                    Some(Kind::Literal) => li += 1,
                    Some(Kind::ZstdDelta | Kind::RefLiteral) => di += 1,
                    _ => {}
                }
                rep.rejected.push((e.no, "page outside the frame's chunk"));
                continue;
            }
            let r: Result<(), &'static str> = match e.kind {
                None => Err("unknown page kind"),
                Some(Kind::Zero) => {
                    page.fill(0);
                    Ok(())
                }
                Some(Kind::Raw) if e.inline.len() == PAGE => {
                    page.copy_from_slice(e.inline);
                    Ok(())
                }
                Some(Kind::Raw) => Err("raw page of the wrong length"),
                Some(Kind::Same) => {
                    match store.base(e.no) {
                        None => rep.rejected.push((e.no, "unchanged page the receiver does not hold")),
                        // Written only where the store's copy differs from the round's start (a
                        // page is written once a round): nothing is dirtied for nothing.
                        Some(b) if store.get(e.no) == Some(b) => rep.applied += 1,
                        Some(b) => {
                            page.copy_from_slice(b);
                            store.put(e.no, &page);
                            rep.applied += 1;
                        }
                    }
                    continue;
                }
                Some(Kind::Literal) => {
                    li += 1;
                    lit_state.map(|()| page.copy_from_slice(&lit_pages[(li - 1) * PAGE..li * PAGE]))
                }
                Some(Kind::ZstdDelta | Kind::RefLiteral) => {
                    di += 1;
                    delta_state.map(|()| page.copy_from_slice(&delta_pages[(di - 1) * PAGE..di * PAGE]))
                }
                Some(Kind::Xbzrle) => match store.base(e.no) {
                    None => Err("delta against a page the receiver does not hold"),
                    Some(o) => xbzrle_decode(o, e.inline, &mut page).ok_or("delta does not apply"),
                },
                Some(Kind::Dup) => match get_leb(e.inline) {
                    Some((src, [])) => {
                        let d = Deferred { no: e.no, src, sum: e.sum };
                        if !Self::apply_dup(d, store) {
                            rep.deferred.push(d);
                        } else {
                            rep.applied += 1;
                        }
                        continue;
                    }
                    _ => Err("duplicate reference malformed"),
                },
            };
            match r {
                Ok(()) if e.kind == Some(Kind::Zero) || page_sum(e.no, &page) == e.sum => {
                    store.put(e.no, &page);
                    rep.applied += 1;
                }
                Ok(()) => rep.rejected.push((e.no, "decoded page does not match its checksum")),
                Err(why) => rep.rejected.push((e.no, why)),
            }
        }
        Ok(rep)
    }

    fn apply_dup(d: Deferred, store: &mut dyn PageStore) -> bool {
        let Some(src) = store.get(d.src) else { return false };
        if page_sum(d.no, src) != d.sum {
            return false;
        }
        let copy = src.to_vec();
        store.put(d.no, &copy);
        true
    }

    /// Retries deferred duplicates (at the end of a round); those that still do not verify are
    /// refused for re-sending. A copy and a checksum each: no decoder state is needed.
    pub fn retry(deferred: &[Deferred], store: &mut dyn PageStore) -> DecodeReport {
        let mut rep = DecodeReport::default();
        // A duplicate may depend on another deferred one: retry until nothing changes.
        let mut left: Vec<Deferred> = deferred.to_vec();
        loop {
            let before = left.len();
            left.retain(|d| {
                let ok = Self::apply_dup(*d, store);
                rep.applied += u64::from(ok);
                !ok
            });
            if left.len() == before {
                break;
            }
        }
        rep.rejected = left.iter().map(|d| (d.no, "duplicate whose source never matched its checksum")).collect();
        rep
    }
}

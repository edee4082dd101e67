//! The WAN link model, free of I/O (time passed in as nanoseconds): mahimahi's shells in one
//! queue per direction. A packet is first subject to random loss, then to a drop-tail queue in
//! front of a serializer of the configured rate, then to the propagation delay (plus jitter);
//! a reordered packet skips the delay. Also: software segmentation of a TCPv4 GSO super-packet,
//! so loss applies per wire segment as on a real link, not per 64 KiB super-packet.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Length of the virtio-net header on each TUN read and write.
pub const VNET_HDR: usize = 10;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;

/// One direction's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay, ns.
    pub delay_ns: u64,
    /// Uniform jitter added to the delay, in [-jitter, +jitter], ns.
    pub jitter_ns: u64,
    /// Serialization rate in bit/s (0: unlimited).
    pub rate_bps: u64,
    /// Probability of losing each wire segment.
    pub loss: f64,
    /// Probability that a packet skips the delay (and so overtakes the ones before it).
    pub reorder: f64,
    /// Drop-tail limit of the serializer's queue, bytes (0: unlimited).
    pub queue_bytes: u64,
}

/// What happened to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Delivered at this time (ns).
    Deliver(u64),
    /// Dropped by random loss.
    Lost,
    /// Dropped by the full queue.
    QueueFull,
}

/// Per-direction counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Packets (segments) offered.
    pub packets: u64,
    /// Wire bytes offered.
    pub bytes: u64,
    /// Lost to random loss.
    pub lost: u64,
    /// Dropped at the full queue.
    pub queue_drops: u64,
    /// Super-packets split in software.
    pub segmented: u64,
}

/// One direction of the link.
#[derive(Debug)]
pub struct Link {
    p: LinkParams,
    rng: u64,
    link_free_ns: u64,
    seq: u64,
    heap: BinaryHeap<(Reverse<u64>, Reverse<u64>, Vec<u8>)>,
    /// Counters.
    pub stats: Stats,
}

impl Link {
    /// A link with a seed for its random choices.
    pub fn new(p: LinkParams, seed: u64) -> Self {
        Self { p, rng: seed | 1, link_free_ns: 0, seq: 0, heap: BinaryHeap::new(), stats: Stats::default() }
    }

    /// The parameters in force.
    pub fn params(&self) -> LinkParams {
        self.p
    }

    /// Changes the parameters from now on; packets already scheduled keep their times (so a
    /// shorter delay lets new packets overtake them once, as a route change would).
    pub fn set_params(&mut self, p: LinkParams) {
        self.p = p;
    }

    fn rand(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether the next wire segment is lost.
    pub fn lose(&mut self) -> bool {
        self.p.loss > 0.0 && self.rand() < self.p.loss
    }

    /// Admits a packet of `wire_bytes` at `now`: queue check, serialization, delay.
    pub fn admit(&mut self, now: u64, wire_bytes: u64) -> Verdict {
        let start = self.link_free_ns.max(now);
        if !self.fits(now, wire_bytes) {
            self.stats.queue_drops += 1;
            return Verdict::QueueFull;
        }
        let tx = if self.p.rate_bps > 0 { (wire_bytes as u128 * 8_000_000_000 / self.p.rate_bps as u128) as u64 } else { 0 };
        self.link_free_ns = start + tx;
        let mut at = self.link_free_ns;
        if !(self.p.reorder > 0.0 && self.rand() < self.p.reorder) {
            at += self.p.delay_ns;
            if self.p.jitter_ns > 0 {
                let j = (self.rand() * 2.0 - 1.0) * self.p.jitter_ns as f64;
                at = (at as i64 + j as i64).max(self.link_free_ns as i64) as u64;
            }
        }
        Verdict::Deliver(at)
    }

    /// Offers one packet read from the TUN (vnet header included) at `now`; what survives is
    /// scheduled. Loss is drawn per wire segment; a super-packet with a lost segment is split.
    pub fn offer(&mut self, now: u64, pkt: &[u8]) {
        let segs = wire_segments(pkt);
        self.stats.packets += segs.count;
        self.stats.bytes += segs.wire_bytes;
        let lost: Vec<bool> = (0..segs.count).map(|_| self.lose()).collect();
        let nlost = lost.iter().filter(|l| **l).count() as u64;
        self.stats.lost += nlost;
        if nlost == 0 && (segs.count == 1 || self.fits(now, segs.wire_bytes)) {
            self.schedule(now, pkt.to_vec(), segs.wire_bytes);
        } else if nlost < segs.count {
            // A lost segment, or a super-packet the queue cannot take whole: as on a real link,
            // each wire segment is lost or queued on its own.
            self.stats.segmented += 1;
            for (i, s) in segment_tcpv4(pkt).into_iter().enumerate() {
                if !lost.get(i).copied().unwrap_or(false) {
                    let w = (s.len() - VNET_HDR) as u64;
                    self.schedule(now, s, w);
                }
            }
        }
    }

    fn fits(&self, now: u64, wire: u64) -> bool {
        if self.p.rate_bps == 0 || self.p.queue_bytes == 0 {
            return true;
        }
        let backlog = (self.link_free_ns.saturating_sub(now) as u128 * self.p.rate_bps as u128 / 8_000_000_000) as u64;
        backlog + wire <= self.p.queue_bytes
    }

    fn schedule(&mut self, now: u64, pkt: Vec<u8>, wire: u64) {
        if let Verdict::Deliver(at) = self.admit(now, wire) {
            self.seq += 1;
            self.heap.push((Reverse(at), Reverse(self.seq), pkt));
        }
    }

    /// When the next packet is due, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|(Reverse(at), _, _)| *at)
    }

    /// Takes the next packet due at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Vec<u8>> {
        if self.next_due()? <= now { self.heap.pop().map(|(_, _, p)| p) } else { None }
    }
}

/// How many wire segments a TUN packet stands for, and their bytes (IP headers included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segs {
    /// Segment count.
    pub count: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
}

/// Segments and wire bytes of a packet with its vnet header.
pub fn wire_segments(pkt: &[u8]) -> Segs {
    let ip_len = pkt.len().saturating_sub(VNET_HDR) as u64;
    if pkt.len() < VNET_HDR || pkt[1] & 0x7f != GSO_TCPV4 {
        return Segs { count: 1, wire_bytes: ip_len };
    }
    let mss = u16::from_le_bytes([pkt[4], pkt[5]]) as u64;
    let Some(hl) = tcp_headers_len(&pkt[VNET_HDR..]) else { return Segs { count: 1, wire_bytes: ip_len } };
    let payload = ip_len.saturating_sub(hl as u64);
    if mss == 0 || payload <= mss {
        return Segs { count: 1, wire_bytes: ip_len };
    }
    let n = payload.div_ceil(mss);
    Segs { count: n, wire_bytes: payload + n * hl as u64 }
}

fn tcp_headers_len(ip: &[u8]) -> Option<usize> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = (ip[0] & 0xf) as usize * 4;
    let doff = (*ip.get(ihl + 12)? >> 4) as usize * 4;
    (ihl + doff <= ip.len()).then_some(ihl + doff)
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut c = data.chunks_exact(2);
    for w in &mut c {
        sum += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    if let [b] = c.remainder() {
        sum += (*b as u32) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Splits a TCPv4 GSO super-packet (vnet header first) into wire-sized packets, each with a
/// plain vnet header and complete IP and TCP checksums. A packet that is not TCPv4 GSO comes
/// back whole.
pub fn segment_tcpv4(pkt: &[u8]) -> Vec<Vec<u8>> {
    if pkt.len() < VNET_HDR || pkt[1] & 0x7f != GSO_TCPV4 {
        return vec![pkt.to_vec()];
    }
    let mss = u16::from_le_bytes([pkt[4], pkt[5]]) as usize;
    let ip = &pkt[VNET_HDR..];
    let Some(hl) = tcp_headers_len(ip) else { return vec![pkt.to_vec()] };
    let ihl = (ip[0] & 0xf) as usize * 4;
    let payload = &ip[hl..];
    if mss == 0 {
        return vec![pkt.to_vec()];
    }
    let n = payload.len().div_ceil(mss).max(1);
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    let seq = u32::from_be_bytes(ip[ihl + 4..ihl + 8].try_into().expect("4"));
    let flags = ip[ihl + 13];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let body = &payload[i * mss..((i + 1) * mss).min(payload.len())];
        let mut s = vec![0u8; VNET_HDR + hl + body.len()];
        s[0] = 0;
        s[1] = GSO_NONE;
        let h = &mut s[VNET_HDR..];
        h[..hl].copy_from_slice(&ip[..hl]);
        h[hl..].copy_from_slice(body);
        let total = (hl + body.len()) as u16;
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = csum_fold(csum_add(0, &h[..ihl]));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h[ihl + 4..ihl + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut f = flags;
        if i + 1 < n {
            f &= !(0x01 | 0x08); // FIN, PSH only on the last
        }
        if i > 0 {
            f &= !0x80; // CWR only on the first
        }
        h[ihl + 13] = f;
        h[ihl + 16..ihl + 18].copy_from_slice(&[0, 0]);
        let tcp_len = (hl - ihl + body.len()) as u32;
        let mut sum = csum_add(0, &h[12..20]);
        sum += 6 + tcp_len;
        sum = csum_add(sum, &h[ihl..]);
        let c = csum_fold(sum);
        h[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rate: u64, delay_ms: u64, queue: u64) -> LinkParams {
        LinkParams { delay_ns: delay_ms * 1_000_000, jitter_ns: 0, rate_bps: rate, loss: 0.0, reorder: 0.0, queue_bytes: queue }
    }

    #[test]
    fn serializes_at_rate_then_delays() {
        let mut l = Link::new(params(8_000_000, 10, 0), 1); // 1 MB/s
        assert_eq!(l.admit(0, 1000), Verdict::Deliver(1_000_000 + 10_000_000));
        assert_eq!(l.admit(0, 1000), Verdict::Deliver(2_000_000 + 10_000_000));
        assert_eq!(l.admit(5_000_000, 1000), Verdict::Deliver(6_000_000 + 10_000_000));
    }

    #[test]
    fn drop_tail_at_queue_limit() {
        let mut l = Link::new(params(8_000_000, 0, 3000), 1);
        for _ in 0..3 {
            assert!(matches!(l.admit(0, 1000), Verdict::Deliver(_)));
        }
        assert_eq!(l.admit(0, 1000), Verdict::QueueFull);
        // 2 ms later two packets have left: room again.
        assert!(matches!(l.admit(2_000_000, 1000), Verdict::Deliver(_)));
    }

    #[test]
    fn loss_rate_matches() {
        let mut p = params(0, 0, 0);
        p.loss = 0.01;
        let mut l = Link::new(p, 42);
        let lost = (0..200_000).filter(|_| l.lose()).count();
        assert!((1800..2200).contains(&lost), "{lost}");
    }

    #[test]
    fn jitter_stays_in_bounds_and_reorder_skips_the_delay() {
        let mut p = params(0, 10, 0);
        p.jitter_ns = 2_000_000;
        let mut l = Link::new(p, 7);
        let at: Vec<u64> = (0..10_000)
            .map(|_| match l.admit(0, 100) {
                Verdict::Deliver(t) => t,
                v => panic!("{v:?}"),
            })
            .collect();
        assert!(at.iter().all(|t| (8_000_000..=12_000_000).contains(t)));
        let mean = at.iter().sum::<u64>() as f64 / at.len() as f64;
        assert!((mean - 10e6).abs() < 0.1e6, "jitter is centred: {mean}");
        let mut p = params(0, 10, 0);
        p.reorder = 0.25;
        let mut l = Link::new(p, 9);
        let early = (0..10_000).filter(|_| l.admit(0, 100) == Verdict::Deliver(0)).count();
        assert!((2300..2700).contains(&early), "{early} of 10000 skipped the delay");
    }

    #[test]
    fn offered_packets_come_out_in_delivery_order() {
        let mut p = params(0, 10, 0);
        p.reorder = 0.5;
        let mut l = Link::new(p, 3);
        for i in 0..100u8 {
            let mut pkt = vec![0u8; VNET_HDR + 20];
            pkt[VNET_HDR] = 0x45;
            pkt[VNET_HDR + 19] = i;
            l.offer(u64::from(i) * 1000, &pkt);
        }
        let (mut last, mut n) = (0, 0);
        while let Some(at) = l.next_due() {
            assert!(at >= last);
            last = at;
            l.pop_due(at).unwrap();
            n += 1;
        }
        assert_eq!(n, 100);
    }

    fn gso_packet(payload: usize, mss: u16) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR + 40 + payload];
        p[0] = 1; // NEEDS_CSUM
        p[1] = GSO_TCPV4;
        p[2..4].copy_from_slice(&40u16.to_le_bytes());
        p[4..6].copy_from_slice(&mss.to_le_bytes());
        let ip = &mut p[VNET_HDR..];
        ip[0] = 0x45;
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 77, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 77, 0, 2]);
        ip[24..28].copy_from_slice(&1000u32.to_be_bytes());
        ip[32] = 5 << 4;
        ip[33] = 0x18; // PSH|ACK
        for (i, b) in ip[40..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    #[test]
    fn segments_carry_the_payload_in_order_with_valid_checksums() {
        let p = gso_packet(3000, 1448);
        assert_eq!(wire_segments(&p), Segs { count: 3, wire_bytes: 3000 + 3 * 40 });
        let segs = segment_tcpv4(&p);
        assert_eq!(segs.len(), 3);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let ip = &s[VNET_HDR..];
            assert_eq!(csum_fold(csum_add(0, &ip[..20])), 0, "IP checksum");
            let mut sum = csum_add(0, &ip[12..20]);
            sum += 6 + (ip.len() - 20) as u32;
            sum = csum_add(sum, &ip[20..]);
            assert_eq!(csum_fold(sum), 0, "TCP checksum of segment {i}");
            let seq = u32::from_be_bytes(ip[24..28].try_into().unwrap());
            assert_eq!(seq, 1000 + (i * 1448) as u32);
            assert_eq!(ip[33] & 0x08 != 0, i == 2, "PSH only on the last");
            joined.extend_from_slice(&ip[40..]);
        }
        assert_eq!(joined, p[VNET_HDR + 40..]);
    }
}

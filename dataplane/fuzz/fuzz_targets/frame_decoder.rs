//! Fuzzes everything that decodes bytes from a peer: the incremental frame reader (plaintext and
//! encrypted codecs), the header decoder, each control payload decoder, the journal parser and
//! the HDE page decoder. None may panic.
#![no_main]

use dataplane::crypto::FrameCodec;
use dataplane::framing::FrameReader;
use dataplane::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let (cut, rest) = (data[0] as usize, &data[1..]);
    let mut codec = FrameCodec::new(0, None);
    let mut r = FrameReader::default();
    let split = cut.min(rest.len());
    r.push(&rest[..split]);
    while let Ok(Some((h, p))) = r.next_frame(&mut codec) {
        let _ = (h, p.len());
    }
    r.push(&rest[split..]);
    while let Ok(Some((_, p))) = r.next_frame(&mut codec) {
        let _ = wire::Hello::decode(&p);
    }
    let _ = wire::Hello::decode(rest);
    let _ = wire::Welcome::decode(rest);
    let _ = wire::Commit::decode(rest);
    let _ = wire::decode_ack(rest);
    let _ = wire::decode_error(rest);
    let _ = wire::ProbeMsg::decode(rest);
    let _ = wire::RdmaConnect::decode(rest);
    let _ = wire::RdmaAccept::decode(rest);
    let _ = wire::RdmaCredit::decode(rest);
    if rest.len() >= wire::PREAMBLE_LEN {
        let _ = wire::Preamble::decode(rest[..wire::PREAMBLE_LEN].try_into().unwrap());
    }
    if rest.len() >= wire::HEADER_LEN {
        let _ = wire::FrameHeader::decode(rest[..wire::HEADER_LEN].try_into().unwrap());
    }
    let _ = dataplane::session::parse_journal(rest);
    // The HDE page decoder: whatever it writes must carry a matching checksum.
    let mut store = Store(std::collections::HashMap::new());
    store.0.insert(0, vec![7u8; dataplane::hde::PAGE]);
    if let Ok(mut d) = dataplane::hde::Decoder::new(None) {
        let _ = d.decode(rest, &mut store);
    }
    // Past the page list's checksum too: the input's first two bytes say where the list ends,
    // and its checksum goes there, so that the entries and blocks behind it are reached.
    if rest.len() >= 2 {
        let at = (usize::from(u16::from_le_bytes([rest[0], rest[1]]))).min(rest.len() - 2);
        let (list, blocks) = rest[2..].split_at(at);
        let mut frame = list.to_vec();
        frame.extend_from_slice(&dataplane::hde::list_sum(list).to_le_bytes());
        frame.extend_from_slice(blocks);
        if let Ok(mut d) = dataplane::hde::Decoder::new(None) {
            let _ = d.decode(&frame, &mut store);
        }
    }
});

struct Store(std::collections::HashMap<u64, Vec<u8>>);
impl dataplane::hde::PageStore for Store {
    fn get(&self, no: u64) -> Option<&[u8]> {
        self.0.get(&no).map(Vec::as_slice)
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        self.0.insert(no, page.to_vec());
    }
}

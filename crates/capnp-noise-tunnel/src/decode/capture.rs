//! Capture files (pcap, pcapng) into TCP connections.
//!
//! The file formats are pcap-parser's (rusticata), the packet headers
//! etherparse's. TCP reassembly is this module's own, small and bounded:
//! no maintained crate does it without pulling a capture library or a
//! runtime in (parse-tcp has one release and needs libc threads and
//! eyre; protolens targets application protocols). It follows sequence
//! numbers per direction, drops retransmitted bytes, holds a few
//! out-of-order segments, and stops a direction at the first gap (bytes
//! that the capture lacks), saying so.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_parser::{Block, Linktype, PcapBlockOwned, PcapError};

use super::{Connection, Stream};

/// What a capture may make the decoder keep, so that a hostile capture
/// cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes kept per direction of a connection.
    pub per_stream: usize,
    /// Bytes kept over all connections.
    pub total: usize,
    /// Connections followed.
    pub connections: usize,
    /// Out-of-order segments held per direction.
    pub out_of_order: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_stream: 64 << 20,
            total: 512 << 20,
            connections: 10_000,
            out_of_order: 256,
        }
    }
}

const TRUNCATED: &str = "the capture is truncated: it ends in the middle of a packet record";

/// The largest capture record accepted (pcap-parser's buffer).
const MAX_RECORD: usize = 1 << 20;

/// The connections of a capture, in the order they started, and notes on
/// what could not be read.
#[derive(Debug, Default)]
pub struct Capture {
    /// The TCP connections.
    pub connections: Vec<Connection>,
    /// Problems with the capture as a whole (a truncated file, packets of
    /// an unknown link type, limits reached).
    pub notes: Vec<String>,
}

#[derive(Default)]
struct Direction {
    next_seq: Option<u32>,
    stream: Stream,
    /// Segments that arrived ahead of `next_seq`.
    ahead: Vec<(u32, Vec<u8>)>,
    stopped: bool,
}

impl Direction {
    fn syn(&mut self, seq: u32) {
        if self.next_seq.is_none() {
            self.next_seq = Some(seq.wrapping_add(1));
        }
    }

    fn segment(&mut self, seq: u32, payload: &[u8], limits: &Limits, budget: &mut usize) {
        if self.stopped || payload.is_empty() {
            return;
        }
        let next = *self.next_seq.get_or_insert(seq);
        let offset = seq.wrapping_sub(next) as i32;
        if offset > 0 {
            // Held back bytes count against the budget like kept ones.
            if self.ahead.len() >= limits.out_of_order || payload.len() > *budget {
                self.stop("too many out-of-order segments: a gap in the TCP stream (segments missing from the capture)".into(), budget);
            } else {
                *budget -= payload.len();
                self.ahead.push((seq, payload.to_vec()));
            }
            return;
        }
        self.append(offset.unsigned_abs() as usize, payload, limits, budget);
        // Segments held back may follow now.
        while let Some(i) = self
            .ahead
            .iter()
            .position(|(s, _)| s.wrapping_sub(self.next_seq.unwrap_or(*s)) as i32 <= 0)
        {
            let (s, p) = self.ahead.swap_remove(i);
            *budget += p.len();
            let skip = self.next_seq.unwrap_or(s).wrapping_sub(s) as usize;
            self.append(skip, &p, limits, budget);
        }
    }

    /// Appends `payload[skip..]` (the part not seen yet).
    fn append(&mut self, skip: usize, payload: &[u8], limits: &Limits, budget: &mut usize) {
        let Some(new) = payload.get(skip..).filter(|p| !p.is_empty()) else {
            return;
        };
        if self.stream.bytes.len() + new.len() > limits.per_stream || new.len() > *budget {
            self.stop(
                "longer than the decoder's memory limit: the rest is not read".into(),
                budget,
            );
            return;
        }
        *budget -= new.len();
        self.stream.bytes.extend_from_slice(new);
        self.next_seq = self.next_seq.map(|n| n.wrapping_add(new.len() as u32));
    }

    fn stop(&mut self, why: String, budget: &mut usize) {
        if !self.stopped {
            self.stopped = true;
            self.stream.problem = Some(why);
            *budget += self.ahead.iter().map(|(_, p)| p.len()).sum::<usize>();
            self.ahead.clear();
        }
    }

    fn finish(mut self) -> Stream {
        if !self.ahead.is_empty() && !self.stopped {
            let missing = self
                .ahead
                .iter()
                .map(|(s, _)| s.wrapping_sub(self.next_seq.unwrap_or(*s)))
                .min()
                .unwrap_or(0);
            let why = format!(
                "gap in the TCP stream: {missing} byte(s) after stream byte {} are missing from the capture; the rest is not read",
                self.stream.bytes.len()
            );
            self.stop(why, &mut 0);
        }
        self.stream
    }
}

struct Tcp {
    initiator: SocketAddr,
    responder: SocketAddr,
    i2r: Direction,
    r2i: Direction,
}

/// Reads a pcap or pcapng capture and reassembles its TCP connections
/// (only those with a port in `ports`, when it is not empty).
///
/// # Errors
/// Only when the input is not a capture file at all; a capture that breaks
/// off, or records that do not parse, give notes.
pub fn read_capture(
    input: impl Read + Send,
    ports: &[u16],
    limits: Limits,
) -> Result<Capture, String> {
    let mut reader = pcap_parser::create_reader(MAX_RECORD, input)
        .map_err(|e| format!("not a pcap or pcapng capture: {e:?}"))?;
    let mut capture = Capture::default();
    let mut tcp: Vec<Tcp> = Vec::new();
    let mut index: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
    let mut budget = limits.total;
    let mut legacy_linktype = Linktype::ETHERNET;
    let mut interfaces: Vec<Linktype> = Vec::new();
    let (mut skipped, mut unknown_link) = (0usize, 0usize);
    let mut incomplete_in_a_row = 0;
    loop {
        let packet: Option<(Linktype, Vec<u8>, bool)> = match reader.next() {
            Ok((offset, block)) => {
                incomplete_in_a_row = 0;
                let packet = match block {
                    PcapBlockOwned::LegacyHeader(h) => {
                        legacy_linktype = h.network;
                        None
                    }
                    PcapBlockOwned::Legacy(b) => {
                        Some((legacy_linktype, b.data.to_vec(), b.caplen < b.origlen))
                    }
                    PcapBlockOwned::NG(Block::SectionHeader(_)) => {
                        interfaces.clear();
                        None
                    }
                    PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                        if interfaces.len() < 1024 {
                            interfaces.push(idb.linktype);
                        }
                        None
                    }
                    PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                        match interfaces.get(epb.if_id as usize) {
                            Some(lt) => Some((*lt, epb.data.to_vec(), epb.caplen < epb.origlen)),
                            None => {
                                skipped += 1;
                                None
                            }
                        }
                    }
                    PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
                        interfaces.first().map(|lt| (*lt, spb.data.to_vec(), false))
                    }
                    PcapBlockOwned::NG(_) => None,
                };
                reader.consume(offset);
                packet
            }
            Err(PcapError::Eof) => break,
            Err(PcapError::UnexpectedEof) => {
                capture.notes.push(TRUNCATED.into());
                break;
            }
            Err(PcapError::Incomplete(_)) => {
                incomplete_in_a_row += 1;
                if incomplete_in_a_row > 2 || reader.refill().is_err() {
                    capture.notes.push(
                        "the capture is truncated: it ends in the middle of a packet record".into(),
                    );
                    break;
                }
                continue;
            }
            Err(PcapError::BufferTooSmall) => {
                capture.notes.push(format!(
                    "a capture record larger than {MAX_RECORD} bytes: the rest of the capture is not read"
                ));
                break;
            }
            Err(e) => {
                capture
                    .notes
                    .push(format!("the capture does not parse from here on: {e:?}"));
                break;
            }
        };
        let Some((linktype, data, _cut)) = packet else {
            continue;
        };
        let sliced = match linktype {
            Linktype::ETHERNET => SlicedPacket::from_ethernet(&data),
            Linktype::LINUX_SLL => SlicedPacket::from_linux_sll(&data),
            Linktype::RAW | Linktype::IPV4 | Linktype::IPV6 => SlicedPacket::from_ip(&data),
            Linktype::NULL | Linktype::LOOP if data.len() >= 4 => SlicedPacket::from_ip(&data[4..]),
            Linktype::LINUX_SLL2 if data.len() >= 20 => SlicedPacket::from_ip(&data[20..]),
            _ => {
                unknown_link += 1;
                continue;
            }
        };
        let Ok(sliced) = sliced else {
            skipped += 1;
            continue;
        };
        let (src_ip, dst_ip): (IpAddr, IpAddr) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            ),
            _ => continue,
        };
        let Some(TransportSlice::Tcp(seg)) = &sliced.transport else {
            continue;
        };
        let src = SocketAddr::new(src_ip, seg.source_port());
        let dst = SocketAddr::new(dst_ip, seg.destination_port());
        if !ports.is_empty() && !ports.contains(&src.port()) && !ports.contains(&dst.port()) {
            continue;
        }
        let opening = seg.syn() && !seg.ack();
        let known = index
            .get(&(src, dst))
            .or_else(|| index.get(&(dst, src)))
            .copied();
        // A new SYN on a pair already seen starts a new connection.
        let reused = opening
            && known.is_some_and(|i| {
                let c = &tcp[i];
                !c.i2r.stream.bytes.is_empty() || !c.r2i.stream.bytes.is_empty()
            });
        let i = match known {
            Some(i) if !reused => i,
            _ => {
                if tcp.len() >= limits.connections {
                    if !capture.notes.iter().any(|n| n.starts_with("more than")) {
                        capture.notes.push(format!(
                            "more than {} connections: the others are not followed",
                            limits.connections
                        ));
                    }
                    continue;
                }
                // The initiator sends the SYN; without one in the capture,
                // the first to send (capnp-noise's initiator speaks first).
                let (initiator, responder) = if seg.syn() && seg.ack() {
                    (dst, src)
                } else {
                    (src, dst)
                };
                index.remove(&(src, dst));
                index.remove(&(dst, src));
                index.insert((initiator, responder), tcp.len());
                tcp.push(Tcp {
                    initiator,
                    responder,
                    i2r: Direction::default(),
                    r2i: Direction::default(),
                });
                tcp.len() - 1
            }
        };
        let conn = &mut tcp[i];
        let dir = if src == conn.initiator {
            &mut conn.i2r
        } else {
            &mut conn.r2i
        };
        if seg.syn() {
            dir.syn(seg.sequence_number());
        }
        dir.segment(seg.sequence_number(), seg.payload(), &limits, &mut budget);
    }
    if skipped > 0 {
        capture.notes.push(format!(
            "{skipped} packet(s) could not be parsed (cut short by the capture's snap length, or malformed): skipped"
        ));
    }
    if unknown_link > 0 {
        capture.notes.push(format!(
            "{unknown_link} packet(s) of a link type the decoder does not read: skipped"
        ));
    }
    capture.connections = tcp
        .into_iter()
        .map(|c| Connection {
            name: format!("{} -> {}", c.initiator, c.responder),
            initiator: c.i2r.finish(),
            responder: c.r2i.finish(),
        })
        .collect();
    Ok(capture)
}

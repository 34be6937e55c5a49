//! A writer of synthetic TCP captures (classic pcap, Ethernet, IPv4): real
//! session bytes cut into segments exactly where a test wants them, for
//! decoders and dissectors of captures (`tests/wireshark.rs`).
//!
//! Each connection gets a three-way handshake, data segments with correct
//! sequence and acknowledgement numbers, and a FIN or RST per side, with
//! correct IPv4 and TCP checksums, so that Wireshark's TCP analysis and
//! reassembly take them as a real capture.
//!
//! ```
//! use capnp_noise_test::pcap::Capture;
//! let mut cap = Capture::new();
//! let c = cap.connect(40001, 4000);
//! cap.send(c, true, b"hello");
//! cap.send(c, false, b"world");
//! cap.fin(c, true);
//! cap.fin(c, false);
//! assert_eq!(&cap.bytes()[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
//! ```

/// The client's address of every connection (the initiator's).
pub const CLIENT_ADDR: [u8; 4] = [10, 0, 0, 1];
/// The server's address of every connection (the responder's).
pub const SERVER_ADDR: [u8; 4] = [10, 0, 0, 2];
/// The largest payload of one segment (an IPv4 packet holds at most 65535 bytes).
pub const MAX_SEGMENT: usize = 65535 - 20 - 20;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

/// A connection of a [`Capture`]: the index [`Capture::connect`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn(usize);

#[derive(Debug)]
struct Flow {
    ports: [u16; 2],
    /// Next sequence number to send, per side (0: client, 1: server).
    next: [u32; 2],
}

/// A capture being written; [`bytes`](Self::bytes) gives the file.
#[derive(Debug)]
pub struct Capture {
    out: Vec<u8>,
    flows: Vec<Flow>,
    micros: u64,
}

impl Default for Capture {
    fn default() -> Self {
        Self::new()
    }
}

impl Capture {
    /// An empty capture (the pcap file header, link type Ethernet).
    pub fn new() -> Self {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4_u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&0i32.to_le_bytes()); // thiszone
        out.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        out.extend_from_slice(&262_144u32.to_le_bytes()); // snaplen
        out.extend_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
        Capture {
            out,
            flows: Vec::new(),
            micros: 1_700_000_000_000_000,
        }
    }

    /// Opens a connection from [`CLIENT_ADDR`]:`client_port` to
    /// [`SERVER_ADDR`]:`server_port` with a three-way handshake.
    pub fn connect(&mut self, client_port: u16, server_port: u16) -> Conn {
        let isn = [
            0x1000_0000 + 0x10_0000 * self.flows.len() as u32,
            0x7000_0000,
        ];
        self.flows.push(Flow {
            ports: [client_port, server_port],
            next: isn,
        });
        let c = Conn(self.flows.len() - 1);
        self.packet(c, true, SYN, &[]);
        self.flows[c.0].next[0] += 1;
        self.packet(c, false, SYN | ACK, &[]);
        self.flows[c.0].next[1] += 1;
        self.packet(c, true, ACK, &[]);
        c
    }

    /// Sends `payload` in one segment, from the client if `from_client`.
    ///
    /// # Panics
    /// If `payload` is longer than [`MAX_SEGMENT`].
    pub fn send(&mut self, c: Conn, from_client: bool, payload: &[u8]) {
        assert!(
            payload.len() <= MAX_SEGMENT,
            "a segment holds at most {MAX_SEGMENT} bytes"
        );
        self.packet(c, from_client, PSH | ACK, payload);
        let side = usize::from(!from_client);
        self.flows[c.0].next[side] = self.flows[c.0].next[side].wrapping_add(payload.len() as u32);
    }

    /// Sends `bytes` cut at the given lengths: one segment per entry of
    /// `cuts`, then one with what remains. A piece longer than
    /// [`MAX_SEGMENT`] goes in several segments; an empty one in none.
    pub fn send_cut(&mut self, c: Conn, from_client: bool, bytes: &[u8], cuts: &[usize]) {
        let mut rest = bytes;
        for n in cuts.iter().copied().chain([bytes.len()]) {
            let (now, later) = rest.split_at(n.min(rest.len()));
            for piece in now.chunks(MAX_SEGMENT) {
                self.send(c, from_client, piece);
            }
            rest = later;
        }
    }

    /// Ends one side's byte stream with a FIN.
    pub fn fin(&mut self, c: Conn, from_client: bool) {
        self.packet(c, from_client, FIN | ACK, &[]);
        let side = usize::from(!from_client);
        self.flows[c.0].next[side] = self.flows[c.0].next[side].wrapping_add(1);
    }

    /// Resets the connection from one side.
    pub fn rst(&mut self, c: Conn, from_client: bool) {
        self.packet(c, from_client, RST | ACK, &[]);
    }

    /// The capture file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.out
    }

    fn packet(&mut self, c: Conn, from_client: bool, flags: u8, payload: &[u8]) {
        let flow = &self.flows[c.0];
        let (me, peer) = if from_client { (0, 1) } else { (1, 0) };
        let (src, dst) = if from_client {
            (CLIENT_ADDR, SERVER_ADDR)
        } else {
            (SERVER_ADDR, CLIENT_ADDR)
        };
        let ack = if flags & SYN != 0 && flags & ACK == 0 {
            0
        } else {
            flow.next[peer]
        };
        let mut tcp = Vec::with_capacity(20 + payload.len());
        tcp.extend_from_slice(&flow.ports[me].to_be_bytes());
        tcp.extend_from_slice(&flow.ports[peer].to_be_bytes());
        tcp.extend_from_slice(&flow.next[me].to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.push(5 << 4);
        tcp.push(flags);
        tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(payload);
        let mut pseudo = Vec::with_capacity(12 + tcp.len());
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&tcp);
        let sum = checksum(&pseudo);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());

        let mut ip = Vec::with_capacity(20 + tcp.len());
        ip.extend_from_slice(&[0x45, 0]);
        ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]); // id, DF, ttl, TCP, checksum
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&tcp);

        let mut frame = Vec::with_capacity(14 + ip.len());
        frame.extend_from_slice(&[2, 0, 0, 0, 0, peer as u8 + 1]);
        frame.extend_from_slice(&[2, 0, 0, 0, 0, me as u8 + 1]);
        frame.extend_from_slice(&[0x08, 0x00]);
        frame.extend_from_slice(&ip);

        self.micros += 1000;
        let secs = (self.micros / 1_000_000) as u32;
        let usecs = (self.micros % 1_000_000) as u32;
        self.out.extend_from_slice(&secs.to_le_bytes());
        self.out.extend_from_slice(&usecs.to_le_bytes());
        self.out
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out
            .extend_from_slice(&(frame.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&frame);
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::checksum;

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}

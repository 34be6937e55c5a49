//! A hostile vat that speaks Cap'n Proto RPC by hand over an authenticated
//! capnp-noise stream: it can send messages no capnp-rpc builder would make
//! (shared pointers, oversized structs) and leave calls unanswered. Used by
//! the hostile-vat tests of the library (`tests/hostile*.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp::serialize;
use capnp::traits::HasTypeId;
use capnp_noise::schema::network_capnp::{vat, HandoffError};
use capnp_noise::stream::{self, NoiseStream, StreamConfig};
use capnp_noise::{Identity, Pinned, VatId};
use capnp_rpc::rpc_capnp::{message, return_};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The question id of the bootstrap (`Vat`) request a [`RawVat`] sends first.
const BOOTSTRAP_QUESTION: u32 = 0;

/// An authenticated connection to a vat's network, driven message by message.
pub struct RawVat {
    stream: NoiseStream<TcpStream>,
    next_question: u32,
}

/// The answer to a raw `Vat.accept` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptAnswer {
    /// The handoff error code (`None` for a capability).
    pub error: HandoffError,
    /// The provider's reason text.
    pub reason: String,
}

/// The method number of `Vat.hello`.
pub const HELLO: u16 = 0;
/// The method number of `Vat.accept`.
pub const ACCEPT: u16 = 3;
/// The method number of `Vat.withdraw`.
pub const WITHDRAW: u16 = 4;

impl RawVat {
    /// Connects to `addr` as `identity`, pinned to `peer`, and asks for the
    /// peer's `Vat` (the bootstrap, question 0). Does not call `hello`.
    ///
    /// # Panics
    /// If the connection or the handshake fails.
    pub async fn connect(identity: &Identity, peer: VatId, addr: SocketAddr) -> RawVat {
        RawVat::try_connect(identity, peer, addr)
            .await
            .expect("TCP connect and handshake")
    }

    /// Like [`connect`](Self::connect), `None` if the connection, the
    /// handshake or the bootstrap request fails.
    ///
    pub async fn try_connect(identity: &Identity, peer: VatId, addr: SocketAddr) -> Option<RawVat> {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let stream = stream::connect(
            tcp,
            identity,
            Arc::new(Pinned(peer)),
            StreamConfig::default(),
        )
        .await
        .ok()?;
        let mut raw = RawVat {
            stream,
            next_question: BOOTSTRAP_QUESTION + 1,
        };
        let mut m = Builder::new_default();
        m.init_root::<message::Builder>()
            .init_bootstrap()
            .set_question_id(BOOTSTRAP_QUESTION);
        let words = serialize::write_message_to_words(&m);
        raw.stream.write_all(&words).await.ok()?;
        raw.stream.flush().await.ok()?;
        Some(raw)
    }

    /// Calls `Vat.hello` and waits for its answer: afterwards the connection
    /// is the pair's connection and every `Vat` call is served.
    ///
    /// # Panics
    /// If the call fails.
    pub async fn hello(&mut self) {
        let q = self.call(HELLO, |_| {}).await;
        let words = self.answer(q).await;
        let reader = serialize::read_message(&mut &words[..], ReaderOptions::new()).unwrap();
        let ret = reader.get_root::<message::Reader>().unwrap();
        match ret.which().unwrap() {
            message::Return(r) => match r.unwrap().which().unwrap() {
                return_::Results(_) => {}
                _ => panic!("hello was not answered with results"),
            },
            _ => unreachable!(),
        }
    }

    /// Sends a call of `method` on the peer's `Vat`, with parameters filled
    /// by `params` (given the `Payload.content` pointer). Returns its
    /// question id.
    pub async fn call(
        &mut self,
        method: u16,
        params: impl FnOnce(capnp::any_pointer::Builder<'_>),
    ) -> u32 {
        let mut m = Builder::new_default();
        let q = self.fill_call(&mut m, method, params);
        self.send_words(&serialize::write_message_to_words(&m))
            .await;
        q
    }

    /// A call message of `method` built in `m`; returns its question id.
    fn fill_call(
        &mut self,
        m: &mut Builder<HeapAllocator>,
        method: u16,
        params: impl FnOnce(capnp::any_pointer::Builder<'_>),
    ) -> u32 {
        let q = self.next_question;
        self.next_question += 1;
        let mut call = m.init_root::<message::Builder>().init_call();
        call.set_question_id(q);
        call.set_interface_id(<vat::Client as HasTypeId>::TYPE_ID);
        call.set_method_id(method);
        call.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(BOOTSTRAP_QUESTION);
        params(call.init_params().init_content());
        q
    }

    /// Sends a `Vat.accept` whose contact's `introduction` is a struct with
    /// `pointers` pointer fields (`pointers - 5` of them unknown to the
    /// schema), every one pointing at the same `blob`-byte `Data`: about
    /// `8 * pointers + blob` bytes on the wire, `pointers * blob` once the
    /// sharing is undone by a copy. Returns the question id and the size
    /// of the message sent, in bytes.
    pub async fn accept_shared_blob(&mut self, pointers: u16, blob: u32) -> (u32, usize) {
        let mut m = Builder::new_default();
        let q = self.fill_call(&mut m, ACCEPT, |content| {
            // The contact is the last object allocated: its three pointers
            // (introduction, signature, forwards) end the segment.
            content
                .init_as::<vat::accept_params::Builder>()
                .init_completion()
                .init_contact();
        });
        let mut words = serialize::write_message_to_words(&m);
        let segment_words = u32::from_le_bytes(words[4..8].try_into().unwrap()) as usize;
        assert_eq!(words.len(), 8 + 8 * segment_words, "one segment");
        let word = |i: usize| 8 + 8 * i;
        // The introduction pointer: the contact's first pointer, three words
        // from the end; the crafted struct follows the segment at once.
        let intro_ptr = segment_words - 3;
        let start = segment_words;
        let offset = (start - (intro_ptr + 1)) as u32;
        let struct_ptr = u64::from(offset << 2) | (1u64 << 32) | (u64::from(pointers) << 48);
        words[word(intro_ptr)..word(intro_ptr) + 8].copy_from_slice(&struct_ptr.to_le_bytes());
        let blob_words = blob.div_ceil(8) as usize;
        let blob_at = start + 1 + pointers as usize;
        let total = blob_at + blob_words;
        words.resize(8 + 8 * total, 0);
        // The data section: expiresAt, far in the future.
        words[word(start)..word(start) + 8].copy_from_slice(&4_000_000_000u64.to_le_bytes());
        for i in 0..pointers as usize {
            let at = start + 1 + i;
            let offset = (blob_at - (at + 1)) as u32;
            // A list pointer (kind 1) of `blob` bytes (element size 2).
            let list_ptr = u64::from((offset << 2) | 1) | (2u64 << 32) | (u64::from(blob) << 35);
            words[word(at)..word(at) + 8].copy_from_slice(&list_ptr.to_le_bytes());
        }
        for b in &mut words[word(blob_at)..word(blob_at) + blob as usize] {
            *b = 0xa5;
        }
        words[4..8].copy_from_slice(&(total as u32).to_le_bytes());
        self.send_words(&words).await;
        (q, words.len())
    }

    /// Reads the peer's messages until the `Return` of question `q`, and
    /// reads it as the results of `Vat.accept`.
    ///
    /// # Panics
    /// If the connection fails or the answer is not accept's results.
    pub async fn accept_answer(&mut self, q: u32) -> AcceptAnswer {
        let words = self.answer(q).await;
        let reader = serialize::read_message(&mut &words[..], ReaderOptions::new()).unwrap();
        let msg = reader.get_root::<message::Reader>().unwrap();
        let message::Return(ret) = msg.which().unwrap() else {
            unreachable!()
        };
        match ret.unwrap().which().unwrap() {
            return_::Results(payload) => {
                let results: vat::accept_results::Reader =
                    payload.unwrap().get_content().get_as().unwrap();
                AcceptAnswer {
                    error: results.get_error().unwrap(),
                    reason: results.get_reason().unwrap().to_string().unwrap(),
                }
            }
            return_::Exception(e) => panic!(
                "accept failed: {}",
                e.unwrap().get_reason().unwrap().to_string().unwrap()
            ),
            _ => panic!("accept was not answered"),
        }
    }

    /// The next message the peer sends, as serialized words.
    ///
    /// # Panics
    /// If the stream fails or ends.
    pub async fn next_message(&mut self) -> Vec<u8> {
        let mut head = [0u8; 4];
        self.stream.read_exact(&mut head).await.expect("message");
        let segments = u32::from_le_bytes(head) as usize + 1;
        assert!(segments < 64, "{segments} segments");
        let table_len = (4 * (segments + 1)).next_multiple_of(8) - 4;
        let mut table = vec![0u8; table_len];
        self.stream.read_exact(&mut table).await.expect("table");
        let words: usize = (0..segments)
            .map(|i| u32::from_le_bytes(table[4 * i..4 * i + 4].try_into().unwrap()) as usize)
            .sum();
        let mut all = head.to_vec();
        all.extend_from_slice(&table);
        let body = all.len();
        all.resize(body + 8 * words, 0);
        self.stream
            .read_exact(&mut all[body..])
            .await
            .expect("body");
        all
    }

    /// Reads messages until the `Return` of question `q`.
    async fn answer(&mut self, q: u32) -> Vec<u8> {
        loop {
            let words = self.next_message().await;
            let reader = serialize::read_message(&mut &words[..], ReaderOptions::new()).unwrap();
            let msg = reader.get_root::<message::Reader>().unwrap();
            if let Ok(message::Return(Ok(r))) = msg.which() {
                if r.get_answer_id() == q {
                    return words;
                }
            }
        }
    }

    async fn send_words(&mut self, words: &[u8]) {
        self.stream.write_all(words).await.expect("send");
        self.stream.flush().await.expect("flush");
    }
}

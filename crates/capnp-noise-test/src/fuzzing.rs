//! The bodies of the fuzz targets, shared by the cargo-fuzz workspace in
//! `fuzz/` and by `tests/fuzz_corpus.rs`, which replays every committed
//! corpus file on stable Rust so that findings stay fixed.
//!
//! Compiled only with the `testing` feature (and in this crate's own
//! tests): the targets drive the deterministic keys of [`crate::fixtures`],
//! which is how fuzz input gets past authentication.
//!
//! Every target is a [`Check`]: it takes arbitrary bytes, never fails on
//! them, and panics when an invariant of the code under test breaks.
//!
//! Adding a target:
//! 1. write `pub fn NAME(data: &[u8])` in a module here and add it to
//!    [`TARGETS`] (and its seed inputs to [`seeds`]);
//! 2. copy any file of `fuzz/fuzz_targets/` to `NAME.rs`, changing the name,
//!    and add its `[[bin]]` to `fuzz/Cargo.toml`;
//! 3. `CAPNP_NOISE_REGEN_CORPUS=1 cargo test --test fuzz_corpus` writes the
//!    seeds to `fuzz/corpus/NAME/`.
//!
//! `cargo test --test fuzz_corpus` fails while these disagree.

mod decode;
mod files;
mod handshake;
mod intro;
mod pair_ops;
mod parsers;
mod support;
mod transport;
mod tunnel;

pub use decode::{decode, keylog_line};
pub use files::{allow_list, key_file, known_vats, sturdy_capnp, sturdy_uri};
pub use handshake::{initiator, initiator_ik, responder, responder_ik};
pub use intro::introduction;
pub use pair_ops::{pair_ops, PairInput, PairOp, Side};
pub use parsers::{frame, payload, preamble, vat_id};
pub use support::{Plan, CHEAP_CRYPTO};
pub use transport::{transport, TransportOp};
pub use tunnel::tunnel_config;

/// A fuzz target's body: panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every target, by the name of its `fuzz/fuzz_targets/` file and corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("frame", frame),
    ("preamble", preamble),
    ("payload", payload),
    ("vat_id", vat_id),
    ("responder", responder),
    ("responder_ik", responder_ik),
    ("initiator", initiator),
    ("initiator_ik", initiator_ik),
    ("transport", transport),
    ("pair_ops", pair_ops),
    ("introduction", introduction),
    ("key_file", key_file),
    ("allow_list", allow_list),
    ("known_vats", known_vats),
    ("sturdy_uri", sturdy_uri),
    ("sturdy_capnp", sturdy_capnp),
    ("tunnel_config", tunnel_config),
    ("keylog_line", keylog_line),
    ("decode", decode),
];

/// The target called `name`.
pub fn check_for(name: &str) -> Option<Check> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// A seed input, generated from real protocol bytes.
#[derive(Debug, Clone)]
pub struct Seed {
    /// The target it is for.
    pub target: &'static str,
    /// Its file name in `fuzz/corpus/<target>/`, without the `seed-` prefix.
    pub name: String,
    /// The input.
    pub bytes: Vec<u8>,
}

impl Seed {
    fn new(target: &'static str, name: impl Into<String>, bytes: Vec<u8>) -> Seed {
        Seed {
            target,
            name: name.into(),
            bytes,
        }
    }

    /// The seed's file name: `seed-<name>`.
    pub fn file_name(&self) -> String {
        format!("seed-{}", self.name)
    }
}

/// The seed corpus of every target.
pub fn seeds() -> Vec<Seed> {
    let mut v = parsers::seeds();
    v.extend(handshake::seeds());
    v.extend(transport::seeds());
    v.extend(pair_ops::seeds());
    v.extend(intro::seeds());
    v.extend(files::seeds());
    v.extend(tunnel::seeds());
    v.extend(decode::seeds());
    v
}

/// The environment variable that makes a fuzz target binary write every
/// target's seeds, as its build makes them, and exit (see [`init`]).
pub const WRITE_SEEDS_VAR: &str = "CAPNP_NOISE_FUZZ_WRITE_SEEDS";

/// Writes every target's [`seeds`] to `dir/<target>/seed-<name>`.
///
/// # Errors
/// The I/O error of a directory or file that could not be written.
pub fn write_seeds(dir: &std::path::Path) -> std::io::Result<()> {
    for seed in seeds() {
        let target_dir = dir.join(seed.target);
        std::fs::create_dir_all(&target_dir)?;
        std::fs::write(target_dir.join(seed.file_name()), &seed.bytes)?;
    }
    Ok(())
}

/// Every fuzz target's `init`: with [`WRITE_SEEDS_VAR`] set to a directory,
/// writes the seeds there ([`write_seeds`]) and exits.
///
/// The committed seeds are made with real crypto. A cheap-crypto build
/// (see [`CHEAP_CRYPTO`]) refuses their handshake messages, tags and
/// signatures, so `fuzz/run-all cheap` has a target binary write the seeds
/// its own build makes and gives them to libFuzzer as a second corpus
/// directory (read, never written).
pub fn init() {
    if let Some(dir) = std::env::var_os(WRITE_SEEDS_VAR) {
        let dir = std::path::PathBuf::from(dir);
        if let Err(e) = write_seeds(&dir) {
            eprintln!("{WRITE_SEEDS_VAR}: cannot write {}: {e}", dir.display());
            std::process::exit(1);
        }
        eprintln!(
            "{WRITE_SEEDS_VAR}: seeds written to {} (cheap crypto: {CHEAP_CRYPTO})",
            dir.display()
        );
        std::process::exit(0);
    }
}

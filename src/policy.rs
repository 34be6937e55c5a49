//! Trust policies: who may be on the other end of a connection.
//!
//! A [`PeerPolicy`] is consulted once per handshake, after the peer has
//! *proved* its VatId and before any application data flows: by the
//! initiator after message 2 (so a refused responder never learns the
//! initiator's identity, which is only sent in message 3), and by the
//! responder after message 3.
//!
//! Policies here:
//!
//! * [`Pinned`]: exactly one VatId;
//! * [`AllowList`]: the VatIds listed in a file (like OpenSSH's
//!   `authorized_keys`), reloaded when the file changes, or given in memory;
//! * [`Tofu`]: trust on first use, keyed by the dialed address (like
//!   OpenSSH's `known_hosts`): the first VatId seen at an address is
//!   recorded, a different one later is refused;
//! * [`AnyVat`]: any authenticated vat; the application decides later;
//! * any closure `Fn(&VatId, &PeerContext) -> Result<(), Refusal>`.
//!
//! ```
//! use std::sync::Arc;
//! use capnp_noise::{AllowList, Identity, PeerContext, PeerPolicy, Pinned};
//!
//! let alice = Identity::generate().vat_id();
//! let mallory = Identity::generate().vat_id();
//! let ctx = PeerContext::responder(None);
//!
//! let pinned: Arc<dyn PeerPolicy> = Arc::new(Pinned(alice));
//! assert!(pinned.check(&alice, &ctx).is_ok());
//!
//! let friends = AllowList::from_vat_ids([alice]);
//! assert!(friends.check(&alice, &ctx).is_ok());
//! let refusal = friends.check(&mallory, &ctx).unwrap_err();
//! assert!(refusal.to_string().contains("not in the allow-list"));
//! ```
//!
//! # File formats
//!
//! Both files are UTF-8 text, one entry per line. Blank lines and lines
//! whose first non-blank character is `#` are ignored; anything after the
//! last field, separated by whitespace, is a comment.
//!
//! ```text
//! # allow-list: VATID [comment]
//! vat1...   alice's laptop
//!
//! # known-vats: ADDRESS VATID [comment]   (ADDRESS exactly as dialed)
//! example.com:4000 vat1...
//! [::1]:4000 vat1...
//! ```

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::keyfile::{io_error, read_limited, read_limited_if_exists, write_atomic};
use crate::vat_id::{shorten, VatId};

/// Why a policy refused a peer. The text reaches logs and the local error,
/// never the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Refusal {
    /// A refusal with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal(reason.into())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a policy knows about a connection besides the peer's VatId.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PeerContext {
    /// The remote socket address, when the transport has one.
    pub remote_addr: Option<SocketAddr>,
    /// The address the local side dialed, as the user wrote it ("host:port"),
    /// when the local side is the initiator. Trust-on-first-use keys on it.
    pub dialed: Option<String>,
    /// True when the local side is the initiator.
    pub local_is_initiator: bool,
}

impl PeerContext {
    /// A context for the initiator side that dialed `dialed`.
    pub fn initiator(dialed: Option<String>, remote_addr: Option<SocketAddr>) -> Self {
        PeerContext {
            remote_addr,
            dialed,
            local_is_initiator: true,
        }
    }

    /// A context for the responder side.
    pub fn responder(remote_addr: Option<SocketAddr>) -> Self {
        PeerContext {
            remote_addr,
            dialed: None,
            local_is_initiator: false,
        }
    }
}

/// Decides whether an authenticated peer may continue.
///
/// The check runs synchronously inside the handshake, on the task (and so
/// the runtime thread) that drives the connection, so it should return
/// quickly; [`Tofu`] is the one built-in policy that can block, on file
/// I/O and for at most its lock timeout.
pub trait PeerPolicy: Send + Sync {
    /// Accepts or refuses `peer`.
    ///
    /// # Errors
    /// A [`Refusal`] with a reason for the local log and error.
    fn check(&self, peer: &VatId, ctx: &PeerContext) -> Result<(), Refusal>;

    /// The one VatId this policy accepts, if it accepts exactly one
    /// ([`Pinned`]). A client that resumes (`rpc::connect` with
    /// `ClientConfig::resumption`) looks it up in its resumption cache
    /// before any handshake; with `None` (the default) it cannot know the
    /// server in advance and runs `XX`.
    fn pinned_vat(&self) -> Option<VatId> {
        None
    }
}

impl<F> PeerPolicy for F
where
    F: Fn(&VatId, &PeerContext) -> Result<(), Refusal> + Send + Sync,
{
    fn check(&self, peer: &VatId, ctx: &PeerContext) -> Result<(), Refusal> {
        self(peer, ctx)
    }
}

/// Accepts any vat that proves its identity. For peer-to-peer use where the
/// application looks at the VatId itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyVat;

impl PeerPolicy for AnyVat {
    fn check(&self, _: &VatId, _: &PeerContext) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Accepts exactly one VatId.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned(pub VatId);

impl PeerPolicy for Pinned {
    fn pinned_vat(&self) -> Option<VatId> {
        Some(self.0)
    }

    fn check(&self, peer: &VatId, _: &PeerContext) -> Result<(), Refusal> {
        if *peer == self.0 {
            Ok(())
        } else {
            Err(Refusal(format!(
                "expected {}, but the peer is {peer}",
                self.0
            )))
        }
    }
}

/// The largest allow-list or known-vats file read (about 60 000 entries).
pub const MAX_LIST_FILE_LEN: u64 = 4 * 1024 * 1024;

/// How long after a file's modification time its (mtime, length) stamp is
/// not trusted to reveal a change, because a second write within the
/// file system's timestamp granularity would leave it unchanged. Within
/// this window the content is re-read and compared by hash.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// One meaningful line of a list file: its 1-based number and its fields.
struct ListLine<'a> {
    number: usize,
    fields: Vec<&'a str>,
}

/// Splits a list file into lines with their first `fields` whitespace
/// separated fields (the rest is a comment), skipping blank and `#` lines.
fn list_lines(text: &str, fields: usize) -> impl Iterator<Item = ListLine<'_>> {
    text.lines().enumerate().filter_map(move |(i, line)| {
        let line = line.trim();
        (!line.is_empty() && !line.starts_with('#')).then(|| ListLine {
            number: i + 1,
            fields: line.split_whitespace().take(fields).collect(),
        })
    })
}

/// The text of a list file, without the byte-order mark some editors add.
fn list_text<'a>(bytes: &'a [u8], path: &Path, what: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes)
        .map(|t| t.strip_prefix('\u{feff}').unwrap_or(t))
        .map_err(|e| Error::Key(format!("{what} {} is not UTF-8 text: {e}", path.display())))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data behind (every
    // update replaces whole fields), so poisoning is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Quotes `s` for a POSIX shell if it needs it, so advice can be pasted.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+=".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Accepts the VatIds on a list: a file, reloaded when it changes, or a
/// fixed set in memory.
///
/// The file has one VatId per line, optionally followed by whitespace and a
/// comment; blank lines and `#` lines are ignored (see the [module
/// docs](self)). Like OpenSSH's `authorized_keys`, editing the file takes
/// effect for the next connection, without a restart:
///
/// * Before each check (or at most once per
///   [`with_check_interval`](Self::with_check_interval)), the file's
///   modification time and length are compared with those last seen, and the
///   file is re-read if they differ, or if the last change was too recent for
///   them to be trusted; a re-read that finds the same content (by SHA-256)
///   changes nothing.
/// * If the changed file has a malformed line, the previous list stays in
///   force and a warning naming `file:line` is logged (an editor may be
///   half-way through saving).
/// * If the file disappears or becomes unreadable, every peer is refused
///   until it is back: the file is the authority, and an absent list
///   allows no one.
///
/// ```
/// use std::io::Write;
/// use capnp_noise::{AllowList, Identity, PeerContext, PeerPolicy};
/// # fn main() -> capnp_noise::Result<()> {
/// let alice = Identity::generate().vat_id();
/// let mut file = tempfile::NamedTempFile::new().unwrap();
/// writeln!(file, "# who may connect\n{alice} alice").unwrap();
/// let list = AllowList::load(file.path())?;
/// assert!(list.check(&alice, &PeerContext::responder(None)).is_ok());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AllowList {
    path: Option<PathBuf>,
    check_interval: Duration,
    state: Mutex<AllowState>,
}

#[derive(Debug)]
struct AllowState {
    vats: HashSet<VatId>,
    seen: Option<Seen>,
    last_stat: Option<Instant>,
    /// Set while the file cannot be read: why. Every peer is then refused.
    unreadable: Option<String>,
    /// Set while the file's content is malformed (the previous list is in force).
    rejected: Option<Error>,
}

/// What was last read from a list file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    mtime: SystemTime,
    len: u64,
    read_at: SystemTime,
    digest: [u8; 32],
}

impl Seen {
    fn may_hide_a_change(&self) -> bool {
        self.read_at
            .duration_since(self.mtime)
            .map_or(true, |age| age < RACY_WINDOW)
    }
}

impl AllowList {
    /// A fixed list of VatIds, never reloaded.
    pub fn from_vat_ids(vats: impl IntoIterator<Item = VatId>) -> Self {
        AllowList {
            path: None,
            check_interval: Duration::ZERO,
            state: Mutex::new(AllowState {
                vats: vats.into_iter().collect(),
                seen: None,
                last_stat: None,
                unreadable: None,
                rejected: None,
            }),
        }
    }

    /// Loads an allow-list file, to be reloaded when it changes.
    ///
    /// # Errors
    /// [`Error::Key`] if the file cannot be read, or naming `file:line` of
    /// the first malformed line.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self> {
        let list = AllowList {
            path: Some(path.into()),
            ..AllowList::from_vat_ids([])
        };
        list.reload()?;
        Ok(list)
    }

    /// Looks at the file at most once per `interval` (default: before every
    /// check, which costs one `stat` per connection).
    #[must_use]
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The file this list is loaded from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The VatIds currently allowed, sorted (after reloading the file if it
    /// changed).
    pub fn vat_ids(&self) -> Vec<VatId> {
        let mut st = lock(&self.state);
        self.refresh(&mut st);
        let mut v: Vec<VatId> = st.vats.iter().copied().collect();
        v.sort();
        v
    }

    /// Re-reads the file now if it changed, whatever the check interval.
    /// Returns whether the list changed. Does nothing for an in-memory list.
    ///
    /// # Errors
    /// [`Error::Key`] if the file cannot be read (every peer is then
    /// refused until it can), or naming `file:line` of a malformed line (the
    /// previous list stays in force).
    pub fn reload(&self) -> Result<bool> {
        let mut st = lock(&self.state);
        let changed = self.update(&mut st)?;
        match &st.rejected {
            Some(e) => Err(e.clone()),
            None => Ok(changed),
        }
    }

    /// Re-reads the file if it changed; see [`reload`](Self::reload).
    fn update(&self, st: &mut AllowState) -> Result<bool> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        st.last_stat = Some(Instant::now());
        match Self::read_if_changed(path, st.seen) {
            Err(e) => {
                st.vats.clear();
                st.seen = None;
                st.unreadable = Some(e.to_string());
                Err(e)
            }
            Ok(None) => Ok(false),
            Ok(Some((seen, parsed))) => {
                let same_content = st.seen.is_some_and(|s| s.digest == seen.digest);
                st.seen = Some(seen);
                if same_content {
                    return Ok(false);
                }
                st.unreadable = None;
                let vats = parsed.inspect_err(|e| st.rejected = Some(e.clone()))?;
                st.rejected = None;
                let changed = vats != st.vats;
                st.vats = vats;
                Ok(changed)
            }
        }
    }

    /// Stats `path`; if it may have changed since `seen`, reads and hashes
    /// it and parses it (the parse result is separate so a malformed file
    /// still records what was read).
    #[allow(clippy::type_complexity)]
    fn read_if_changed(
        path: &Path,
        seen: Option<Seen>,
    ) -> Result<Option<(Seen, Result<HashSet<VatId>>)>> {
        const WHAT: &str = "allow-list";
        let meta = fs::metadata(path).map_err(|e| io_error(path, WHAT, &e))?;
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(s) = seen {
            if s.mtime == mtime && s.len == meta.len() && !s.may_hide_a_change() {
                return Ok(None);
            }
        }
        let read_at = SystemTime::now();
        let bytes = read_limited(path, MAX_LIST_FILE_LEN, WHAT)?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let new_seen = Seen {
            mtime,
            len: bytes.len() as u64,
            read_at,
            digest,
        };
        if seen.map(|s| s.digest) == Some(digest) {
            return Ok(Some((new_seen, Ok(HashSet::new()))));
        }
        let parsed = list_text(&bytes, path, WHAT).and_then(|t| Self::parse(t, path));
        Ok(Some((new_seen, parsed)))
    }

    /// Parses allow-list text; `path` only names it in errors.
    ///
    /// # Errors
    /// [`Error::Key`] naming `path:line` of the first malformed line.
    pub fn parse(text: &str, path: &Path) -> Result<HashSet<VatId>> {
        list_lines(text, 1)
            .map(|l| {
                l.fields[0]
                    .parse::<VatId>()
                    .map_err(|e| Error::Key(format!("{}:{}: {e}", path.display(), l.number)))
            })
            .collect()
    }

    /// Reloads the file if it is time to look and it changed, logging
    /// (rather than returning) problems.
    fn refresh(&self, st: &mut AllowState) {
        let Some(path) = &self.path else { return };
        if st
            .last_stat
            .is_some_and(|t| t.elapsed() < self.check_interval)
        {
            return;
        }
        let was_unreadable = st.unreadable.is_some();
        let before = st.vats.len();
        match self.update(st) {
            Ok(false) => {}
            Ok(true) => tracing::info!(
                "reloaded allow-list {}: {} vat(s)",
                path.display(),
                st.vats.len()
            ),
            Err(e) if st.unreadable.is_some() => {
                if !was_unreadable {
                    tracing::warn!("{e}; refusing every peer until it can be read");
                }
            }
            Err(e) => tracing::warn!(
                "allow-list changed but was not reloaded; the previous list of \
                 {before} vat(s) stays in force: {e}"
            ),
        }
    }
}

impl PeerPolicy for AllowList {
    fn check(&self, peer: &VatId, _: &PeerContext) -> Result<(), Refusal> {
        let mut st = lock(&self.state);
        self.refresh(&mut st);
        if let Some(why) = &st.unreadable {
            return Err(Refusal(format!("{why}, so no peer is allowed")));
        }
        if st.vats.contains(peer) {
            return Ok(());
        }
        Err(Refusal(match &self.path {
            Some(p) => format!(
                "{peer} is not in the allow-list {}; to allow it, add the line \"{peer}\" to that file",
                p.display()
            ),
            None => format!("{peer} is not in the allow-list"),
        }))
    }
}

/// A record in a known-vats file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownVat {
    /// The address as it was dialed ("host:port").
    pub address: String,
    /// The VatId recorded for it.
    pub vat_id: VatId,
    /// The 1-based line number in the file.
    pub line: usize,
}

/// Trust on first use, keyed by the address the local side dialed, like
/// OpenSSH's `known_hosts`.
///
/// The known-vats file holds `ADDRESS VATID [comment]` lines (see the
/// [module docs](self)); ADDRESS is the text the user dialed, compared
/// exactly (so `localhost:4000` and `127.0.0.1:4000` are different
/// entries). On each outgoing connection:
///
/// * no record for the address: the peer's VatId is appended to the file
///   (created mode 0600 if missing) and the peer accepted;
/// * a record with the peer's VatId: accepted (several records for one
///   address are allowed; any of them matches, which lets a user add a new
///   key before the old one is retired);
/// * records that all differ: refused, with a message that shows the
///   recorded and presented VatIds and the exact command that forgets the
///   old record ([`Tofu::forget`], `capnp-noise known-vats forget`).
///
/// The file is read on every check, so edits apply at once. A malformed
/// line refuses every connection, naming `file:line`. A TOFU policy only
/// makes sense on the side that dials: as a responder it refuses every
/// peer (use [`AllowList`] or [`Pinned`] to accept connections).
///
/// # Several processes
/// A check that finds a record needs no lock: a match is accepted and a
/// mismatch refused on what the file says. Writes are serialised across
/// processes (and across `Tofu` values in one process) by an exclusive
/// lock on a sidecar file, the known-vats path with `.lock` appended
/// (created mode 0600 and left in place). A check that would record a new
/// address takes the lock, reads the file again and decides on what it
/// finds then, so of two processes meeting the same new address at the
/// same moment exactly one records its peer, and the other then compares
/// its peer against that record. [`forget`](Tofu::forget) takes the same
/// lock, so an append is never lost to a concurrent rewrite. A lock held
/// by another process for longer than the lock timeout (default
/// [`DEFAULT_TOFU_LOCK_TIMEOUT`]) refuses the connection and says so. On a
/// file system without locks, writes go ahead unlocked, as before.
///
/// Recording a first use blocks the thread that runs the handshake: for
/// the append and its `fsync`, and, while another process writes, for up to
/// the lock timeout (retrying every 10 ms). Checks against existing records
/// only read the file.
#[derive(Debug)]
pub struct Tofu {
    path: PathBuf,
    lock: Mutex<()>,
    lock_timeout: Duration,
}

/// Default longest wait of a [`Tofu`] check for another process's lock on
/// the known-vats file.
pub const DEFAULT_TOFU_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// An exclusive lock on a known-vats file's sidecar `.lock` file, released
/// when dropped (with the file descriptor).
struct FileLock {
    _file: Option<fs::File>,
}

impl FileLock {
    /// Takes the lock of `path` (its `.lock` sidecar), retrying every 10 ms
    /// for up to `timeout`.
    fn acquire(path: &Path, timeout: Duration) -> io::Result<FileLock> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let mut opts = OpenOptions::new();
        opts.create(true).truncate(false).write(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(&lock_path)?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(FileLock { _file: Some(file) }),
                Err(fs::TryLockError::WouldBlock) if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{} is locked by another process (held for over {timeout:?})",
                            lock_path.display()
                        ),
                    ))
                }
                Err(fs::TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {
                    tracing::warn!(
                        "{}: the file system does not support locks; writing unlocked",
                        lock_path.display()
                    );
                    return Ok(FileLock { _file: None });
                }
                Err(fs::TryLockError::Error(e)) => return Err(e),
            }
        }
    }
}

impl Tofu {
    /// A TOFU policy backed by the known-vats file at `path` (which need not
    /// exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Tofu {
            path: path.into(),
            lock: Mutex::new(()),
            lock_timeout: DEFAULT_TOFU_LOCK_TIMEOUT,
        }
    }

    /// Sets how long a write waits for another process's lock on the file
    /// (default [`DEFAULT_TOFU_LOCK_TIMEOUT`]).
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The known-vats file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All records of the file (an absent file has none).
    ///
    /// # Errors
    /// [`Error::Key`] if the file cannot be read, or naming `file:line` of a
    /// malformed line.
    pub fn records(&self) -> Result<Vec<KnownVat>> {
        let _guard = lock(&self.lock);
        self.read().map(|(records, _)| records)
    }

    /// Reads and parses the file; also says whether a newline must precede
    /// an appended line.
    fn read(&self) -> Result<(Vec<KnownVat>, bool)> {
        const WHAT: &str = "known-vats file";
        // Absence is judged by the open itself: a check of `exists()` after
        // a failed open could see the file another process has just created
        // and report a missing file that is in fact there.
        let Some(bytes) = read_limited_if_exists(&self.path, MAX_LIST_FILE_LEN, WHAT)? else {
            return Ok((Vec::new(), false));
        };
        let text = list_text(&bytes, &self.path, WHAT)?;
        let records = Self::parse(text, &self.path)?;
        Ok((records, !text.is_empty() && !text.ends_with('\n')))
    }

    /// Parses known-vats text; `path` only names it in errors.
    ///
    /// # Errors
    /// [`Error::Key`] naming `path:line` of the first malformed line.
    pub fn parse(text: &str, path: &Path) -> Result<Vec<KnownVat>> {
        list_lines(text, 2)
            .map(|l| {
                let at = || format!("{}:{}", path.display(), l.number);
                let [address, vat] = l.fields[..] else {
                    return Err(Error::Key(format!(
                        "{}: expected \"ADDRESS VATID\", found only {:?}",
                        at(),
                        shorten(l.fields[0])
                    )));
                };
                let vat_id = vat
                    .parse::<VatId>()
                    .map_err(|e| Error::Key(format!("{}: {e}", at())))?;
                Ok(KnownVat {
                    address: address.to_string(),
                    vat_id,
                    line: l.number,
                })
            })
            .collect()
    }

    /// Removes every record for `address`, rewriting the file atomically.
    /// Comments, other records and lines this version cannot parse are kept
    /// as they are. Returns how many records were removed.
    ///
    /// # Errors
    /// [`Error::Key`] if the file cannot be read or written, or another
    /// process holds its lock for longer than the lock timeout.
    pub fn forget(&self, address: &str) -> Result<usize> {
        const WHAT: &str = "known-vats file";
        let _guard = lock(&self.lock);
        // No file, nothing to forget: an error that says so, and no lock
        // file left behind.
        if !self.path.exists() {
            return Err(io_error(&self.path, WHAT, &io::ErrorKind::NotFound.into()));
        }
        let _file_lock = FileLock::acquire(&self.path, self.lock_timeout)
            .map_err(|e| io_error(&self.path, WHAT, &e))?;
        let bytes = read_limited(&self.path, MAX_LIST_FILE_LEN, WHAT)?;
        let text = list_text(&bytes, &self.path, WHAT)?;
        let mut kept = String::with_capacity(text.len());
        let mut removed = 0;
        for line in text.split_inclusive('\n') {
            let t = line.trim();
            if !t.starts_with('#') && t.split_whitespace().next() == Some(address) {
                removed += 1;
            } else {
                kept.push_str(line);
            }
        }
        if removed > 0 {
            write_atomic(&self.path, kept.as_bytes(), true, WHAT)?;
        }
        Ok(removed)
    }

    fn record(&self, address: &str, peer: &VatId, newline_first: bool) -> io::Result<()> {
        let mut opts = OpenOptions::new();
        opts.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut file = opts.open(&self.path)?;
        let line = format!(
            "{}{address} {peer}\n",
            if newline_first { "\n" } else { "" }
        );
        file.write_all(line.as_bytes())?;
        file.sync_all()
    }

    fn changed_key_refusal(&self, address: &str, peer: &VatId, known: &[&KnownVat]) -> Refusal {
        let file = self.path.display();
        let recorded: Vec<String> = known
            .iter()
            .map(|k| format!("  recorded:  {} ({file}:{})", k.vat_id, k.line))
            .collect();
        let lines: Vec<String> = known.iter().map(|k| k.line.to_string()).collect();
        Refusal(format!(
            "THE VAT AT {address} HAS A DIFFERENT KEY than the one recorded for it.\n\
             {}\n  presented: {peer}\n\
             Someone may be intercepting the connection (a man in the middle), or the vat \
             may have a new identity. If you know the change is legitimate, accept it \
             deliberately by forgetting the old record:\n  \
             capnp-noise known-vats forget {} --file {}\n\
             (or delete line {} of {file}) and connect again.",
            recorded.join("\n"),
            shell_quote(address),
            shell_quote(&self.path.to_string_lossy()),
            lines.join(", "),
        ))
    }
}

impl PeerPolicy for Tofu {
    fn check(&self, peer: &VatId, ctx: &PeerContext) -> Result<(), Refusal> {
        let Some(address) = ctx.dialed.as_deref() else {
            return Err(Refusal::new(
                "trust on first use is keyed by the address this side dialed, and this \
                 connection was not dialed by this side; accept connections with an \
                 allow-list or a pinned VatId instead",
            ));
        };
        if address.is_empty()
            || address.starts_with('#')
            || address.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(Refusal(format!(
                "the dialed address {address:?} cannot be a known-vats record \
                 (it is empty, starts with '#', or contains whitespace)"
            )));
        }
        let _guard = lock(&self.lock);
        // Decided on what the file says; `None`: nothing recorded yet.
        let decide = |records: &[KnownVat]| {
            let known: Vec<&KnownVat> = records.iter().filter(|k| k.address == address).collect();
            if known.iter().any(|k| k.vat_id == *peer) {
                Some(Ok(()))
            } else if !known.is_empty() {
                Some(Err(self.changed_key_refusal(address, peer, &known)))
            } else {
                None
            }
        };
        let (records, _) = self.read().map_err(|e| Refusal(e.to_string()))?;
        if let Some(decided) = decide(&records) {
            return decided;
        }
        // New address: record it under the file lock, deciding again on
        // what the file says then (another process may just have recorded
        // it).
        let _file_lock = FileLock::acquire(&self.path, self.lock_timeout).map_err(|e| {
            Refusal(format!(
                "cannot record {peer} for {address} in {}: {e}",
                self.path.display()
            ))
        })?;
        let (records, newline_first) = self.read().map_err(|e| Refusal(e.to_string()))?;
        if let Some(decided) = decide(&records) {
            return decided;
        }
        self.record(address, peer, newline_first).map_err(|e| {
            Refusal(format!(
                "cannot record {peer} for {address} in {}: {e}",
                self.path.display()
            ))
        })?;
        tracing::info!(
            "first connection to {address}: recorded {peer} in {}",
            self.path.display()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn pinned_and_closures() {
        let a = Identity::generate().vat_id();
        let b = Identity::generate().vat_id();
        let ctx = PeerContext::default();
        assert!(Pinned(a).check(&a, &ctx).is_ok());
        let r = Pinned(a).check(&b, &ctx).unwrap_err();
        assert!(r.0.contains(&a.to_string()) && r.0.contains(&b.to_string()));
        let only_b = move |p: &VatId, _: &PeerContext| {
            if *p == b {
                Ok(())
            } else {
                Err(Refusal::new("not b"))
            }
        };
        assert!(only_b.check(&b, &ctx).is_ok());
        assert_eq!(only_b.check(&a, &ctx).unwrap_err().0, "not b");
        assert!(AnyVat.check(&a, &ctx).is_ok());
    }

    #[test]
    fn allow_list_sees_a_change_that_keeps_mtime_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allow");
        let (a, b) = (Identity::generate().vat_id(), Identity::generate().vat_id());
        let write = |vat: VatId, mtime: SystemTime| {
            fs::write(&path, format!("{vat}\n")).unwrap();
            let f = fs::File::options().write(true).open(&path).unwrap();
            f.set_modified(mtime).unwrap();
        };
        let ctx = PeerContext::responder(None);
        let now = SystemTime::now();
        write(a, now);
        let list = AllowList::load(&path).unwrap();
        write(b, now);
        assert!(list.check(&b, &ctx).is_ok());
        assert!(list.check(&a, &ctx).is_err());
    }

    #[test]
    fn list_files_from_windows_editors_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allow");
        let vat = Identity::generate().vat_id();
        fs::write(&path, format!("\u{feff}# list\r\n{vat} me\r\n")).unwrap();
        assert_eq!(AllowList::load(&path).unwrap().vat_ids(), [vat]);
        let known = Tofu::new(&path);
        fs::write(&path, format!("\u{feff}h:1 {vat}\r\n")).unwrap();
        assert_eq!(known.records().unwrap()[0].vat_id, vat);
    }

    #[test]
    fn a_known_vats_error_does_not_repeat_a_long_line() {
        // Found by the known_vats fuzz target: the lone field came back whole.
        let text = format!("{}\n", "x".repeat(100_000));
        let err = Tofu::parse(&text, Path::new("kv")).unwrap_err().to_string();
        assert!(err.starts_with("kv:1: ") && err.len() < 200, "{err:.300}");
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("a/b-c_d.e:1"), "a/b-c_d.e:1");
        assert_eq!(shell_quote("[::1]:80"), "'[::1]:80'");
        assert_eq!(shell_quote("my file"), "'my file'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}

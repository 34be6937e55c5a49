//! `capnp-noise decode`: print the capnp-noise connections of a capture.

use std::io::{Read, Write};
use std::path::PathBuf;

use capnp_noise_tunnel::decode::capture::{read_capture, Limits};
use capnp_noise_tunnel::decode::{decode_connection, Connection, KeyTable, MAX_KEY_LOG_LEN};

use super::CmdResult;

/// Arguments of `decode`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Capture a session, then decode it:
  tcpdump -i lo -w session.pcap port 7000         (as root; Ctrl-C to stop)
  CAPNP_NOISE_KEYLOG=keys.log capnp-noise tunnel ...   (or your application's key log)
  capnp-noise decode --keylog keys.log session.pcap

Without a key log it prints what travels in clear: the preamble and suite,
the handshake messages and their lengths, and the frames' lengths.")]
pub(crate) struct Args {
    /// A pcap or pcapng capture.
    #[arg(value_name = "CAPTURE", required_unless_present = "initiator")]
    capture: Option<PathBuf>,
    /// A key log (SPEC.md appendix A) to decrypt the handshake payloads
    /// and the frames with.
    #[arg(long, value_name = "FILE")]
    keylog: Option<PathBuf>,
    /// Only the TCP connections to or from this port (repeatable).
    #[arg(long, value_name = "PORT")]
    port: Vec<u16>,
    /// Instead of a capture: the bytes the initiator sent, raw.
    #[arg(
        long,
        value_name = "FILE",
        requires = "responder",
        conflicts_with = "capture"
    )]
    initiator: Option<PathBuf>,
    /// With --initiator: the bytes the responder sent, raw.
    #[arg(long, value_name = "FILE", requires = "initiator")]
    responder: Option<PathBuf>,
}

fn read_at_most(path: &PathBuf, limit: usize) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > limit {
        return Err(format!("{}: larger than {limit} bytes", path.display()));
    }
    Ok(bytes)
}

pub(crate) fn run(args: Args) -> CmdResult {
    let keys = match &args.keylog {
        None => None,
        Some(path) => {
            let bytes = read_at_most(path, MAX_KEY_LOG_LEN)?;
            let (table, notes) = KeyTable::parse(&String::from_utf8_lossy(&bytes));
            for note in notes {
                eprintln!("capnp-noise: {}: {note}", path.display());
            }
            Some(table)
        }
    };
    let limits = Limits::default();
    let (connections, notes) = match (&args.capture, &args.initiator, &args.responder) {
        (_, Some(i), Some(r)) => {
            let name = format!("{} -> {}", i.display(), r.display());
            let conn = Connection::from_streams(
                name,
                read_at_most(i, limits.per_stream)?,
                read_at_most(r, limits.per_stream)?,
            );
            (vec![conn], Vec::new())
        }
        (Some(path), _, _) => {
            let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let capture = read_capture(std::io::BufReader::new(file), &args.port, limits)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            (capture.connections, capture.notes)
        }
        _ => return Err("give a CAPTURE, or --initiator FILE and --responder FILE".into()),
    };
    let mut stdout = std::io::stdout().lock();
    for note in &notes {
        writeln!(stdout, "capture: {note}")?;
    }
    if connections.is_empty() {
        writeln!(stdout, "no TCP connection in the capture")?;
    }
    for conn in &connections {
        let mut out = String::new();
        decode_connection(conn, keys.as_ref(), &mut out);
        stdout.write_all(out.as_bytes())?;
    }
    Ok(())
}

//! The length prefix: every Noise message on the wire, handshake and
//! transport alike, is `len: u16 (big-endian) || message[len]` (SPEC.md,
//! "Framing").
//!
//! [`split_frame`] is the frame decoder: a pure function over the bytes
//! received so far, which is what the `frame` fuzz target exercises.

use super::{LENGTH_PREFIX_LEN, MAX_MESSAGE_LEN};
use crate::error::{Error, ProtocolError};

/// Bounds a receiver applies to the next frame, and the name of what it expects.
#[derive(Debug, Clone, Copy)]
pub struct FrameBounds {
    /// The smallest acceptable message length.
    pub min: usize,
    /// The largest acceptable message length (at most 65535).
    pub max: usize,
    /// What the frame should hold, for error messages.
    pub what: &'static str,
}

/// Looks for one complete frame at the start of `buf`.
///
/// Returns `Ok(None)` while the frame is incomplete, or `Ok(Some((body,
/// consumed)))` with the message body and the number of bytes it occupies,
/// prefix included. The length is checked as soon as the two prefix bytes
/// are there, so an unacceptable frame is refused before its body arrives.
///
/// # Errors
/// [`ProtocolError::FrameTooShort`] / [`ProtocolError::FrameTooLong`] when the
/// announced length is outside `bounds` (a zero length is always too short).
pub fn split_frame(buf: &[u8], bounds: FrameBounds) -> Result<Option<(&[u8], usize)>, Error> {
    let Some(len) = peek_len(buf) else {
        return Ok(None);
    };
    if len < bounds.min.max(1) {
        return Err(ProtocolError::FrameTooShort {
            len,
            min: bounds.min.max(1),
            what: bounds.what,
        }
        .into());
    }
    if len > bounds.max.min(MAX_MESSAGE_LEN) {
        return Err(ProtocolError::FrameTooLong {
            len,
            max: bounds.max.min(MAX_MESSAGE_LEN),
            what: bounds.what,
        }
        .into());
    }
    let total = LENGTH_PREFIX_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((&buf[LENGTH_PREFIX_LEN..total], total)))
}

/// The announced length of the frame at the start of `buf`, once its prefix is there.
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    match buf {
        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo]) as usize),
        _ => None,
    }
}

/// Writes the length prefix for a message of `len` bytes.
///
/// # Panics
/// If `len` exceeds 65535; callers size messages by construction.
pub fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u16::try_from(len).expect("Noise messages are at most 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: FrameBounds = FrameBounds {
        min: 17,
        max: 65535,
        what: "a transport frame",
    };

    #[test]
    fn incomplete_then_complete() {
        let mut v = Vec::new();
        put_len(&mut v, 20);
        v.extend_from_slice(&[9; 20]);
        for cut in 0..v.len() {
            assert!(split_frame(&v[..cut], B).unwrap().is_none(), "cut {cut}");
        }
        let (body, used) = split_frame(&v, B).unwrap().unwrap();
        assert_eq!((body.len(), used), (20, 22));
    }

    #[test]
    fn zero_and_short_lengths_fail_before_the_body() {
        for len in [0usize, 1, 16] {
            let err = split_frame(&(len as u16).to_be_bytes(), B).unwrap_err();
            assert!(
                matches!(err, Error::Protocol(ProtocolError::FrameTooShort { .. })),
                "{err}"
            );
        }
    }

    #[test]
    fn over_max_fails() {
        let b = FrameBounds {
            min: 32,
            max: 32,
            what: "handshake message 1",
        };
        let err = split_frame(&[0, 33], b).unwrap_err();
        assert!(
            err.to_string().contains("too long for handshake message 1"),
            "{err}"
        );
    }
}

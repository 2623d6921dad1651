//! Reply parsing: simple and structured replies read from an untrusted byte stream.
//!
//! [`read_reply`] reads one reply (a simple reply, or one chunk of a structured reply)
//! and checks every length and offset against the request it answers before using it:
//! data chunks must lie inside the requested range, hole and error-offset chunks too,
//! error messages are bounded, block-status payloads are read one extent at a time
//! (extra extents are drained, not stored). Nothing is allocated beyond what the
//! request asked for. A reply that breaks the protocol is a [`ReplyError::Protocol`]
//! with one line saying why; the connection cannot be used after it.

use std::io::Read;

/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Chunk flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// Chunk type: no payload (ends a reply).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole (reads as zeroes) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status extents of one meta context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Longest error message or string the protocol allows (NBD_MAX_STRING_SIZE).
pub const MAX_STRING: usize = 4096;

/// The request a reply answers, as far as parsing needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestInfo {
    /// The command (`CMD_*`).
    pub cmd: u16,
    /// Requested offset.
    pub offset: u64,
    /// Requested length.
    pub len: u32,
}

/// One reply or reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The cookie of the request it answers.
    pub cookie: u64,
    /// Whether this ends the reply.
    pub done: bool,
    /// What it says.
    pub body: Body,
}

/// What a reply or chunk says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Success without payload (a simple reply, or a NONE chunk).
    Ok,
    /// Data for `[offset, offset + data.len())` (a READ's payload).
    Data {
        /// Absolute offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Zeroes for `[offset, offset + len)`.
    Hole {
        /// Absolute offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// The first extent of a block-status chunk.
    Status {
        /// Meta context id.
        context: u32,
        /// Length of the first extent (non-zero).
        len: u32,
        /// Its status flags.
        flags: u32,
    },
    /// An error the server reports for this request (an NBD errno, non-zero).
    Error {
        /// The NBD error number.
        errno: u32,
        /// The server's message (possibly empty).
        message: String,
    },
}

/// Why a reply could not be read.
#[derive(Debug)]
pub enum ReplyError {
    /// The connection failed or closed.
    Io(std::io::Error),
    /// The server broke the protocol; the message says how.
    Protocol(String),
}

impl From<std::io::Error> for ReplyError {
    fn from(e: std::io::Error) -> Self {
        ReplyError::Io(e)
    }
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                write!(f, "Connection closed")
            }
            ReplyError::Io(e) => write!(f, "Failed to read reply: {e}"),
            ReplyError::Protocol(m) => write!(f, "{m}"),
        }
    }
}

fn proto<T>(msg: impl Into<String>) -> Result<T, ReplyError> {
    Err(ReplyError::Protocol(msg.into()))
}

fn read_u16(r: &mut impl Read) -> Result<u16, ReplyError> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> Result<u32, ReplyError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64, ReplyError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads and throws away `n` bytes through a small fixed buffer.
fn drain(r: &mut impl Read, mut n: u64) -> Result<(), ReplyError> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Whether `[off, off + len)` lies inside the request's range.
fn inside(req: &RequestInfo, off: u64, len: u64) -> bool {
    off >= req.offset
        && off
            .checked_add(len)
            .is_some_and(|end| end <= req.offset + u64::from(req.len))
}

/// Reads one reply from `r`. `lookup` names the request a cookie belongs to (`None`:
/// no such request is in flight). `structured` says whether structured replies were
/// negotiated.
pub fn read_reply(
    r: &mut impl Read,
    structured: bool,
    lookup: impl Fn(u64) -> Option<RequestInfo>,
) -> Result<Reply, ReplyError> {
    let magic = read_u32(r)?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let errno = read_u32(r)?;
            let cookie = read_u64(r)?;
            let Some(req) = lookup(cookie) else {
                return proto(format!("Unexpected reply cookie {cookie:#x}"));
            };
            if errno != 0 {
                return Ok(Reply {
                    cookie,
                    done: true,
                    body: Body::Error {
                        errno,
                        message: String::new(),
                    },
                });
            }
            if req.cmd == CMD_READ {
                if structured {
                    return proto("Unexpected simple reply to a read");
                }
                let mut data = vec![0u8; req.len as usize];
                r.read_exact(&mut data)?;
                return Ok(Reply {
                    cookie,
                    done: true,
                    body: Body::Data {
                        offset: req.offset,
                        data,
                    },
                });
            }
            Ok(Reply {
                cookie,
                done: true,
                body: Body::Ok,
            })
        }
        STRUCTURED_REPLY_MAGIC => {
            if !structured {
                return proto("Unexpected structured reply");
            }
            let flags = read_u16(r)?;
            let ty = read_u16(r)?;
            let cookie = read_u64(r)?;
            let length = read_u32(r)?;
            let Some(req) = lookup(cookie) else {
                return proto(format!("Unexpected reply cookie {cookie:#x}"));
            };
            let done = flags & REPLY_FLAG_DONE != 0;
            let body = read_chunk(r, &req, ty, length, done)?;
            Ok(Reply { cookie, done, body })
        }
        other => proto(format!("invalid magic (got {other:#x})")),
    }
}

fn read_chunk(
    r: &mut impl Read,
    req: &RequestInfo,
    ty: u16,
    length: u32,
    done: bool,
) -> Result<Body, ReplyError> {
    let length = u64::from(length);
    match ty {
        REPLY_TYPE_NONE => {
            if !done {
                return proto(
                    "Protocol error: NBD_REPLY_TYPE_NONE chunk without NBD_REPLY_FLAG_DONE flag",
                );
            }
            if length != 0 {
                return proto("Protocol error: NBD_REPLY_TYPE_NONE chunk with nonzero length");
            }
            Ok(Body::Ok)
        }
        REPLY_TYPE_OFFSET_DATA => {
            if req.cmd != CMD_READ {
                return proto("Unexpected structured data chunk");
            }
            if length <= 8 {
                return proto("Protocol error: invalid payload for NBD_REPLY_TYPE_OFFSET_DATA");
            }
            let offset = read_u64(r)?;
            let dlen = length - 8;
            if !inside(req, offset, dlen) {
                return proto("Protocol error: server sent data outside requested range");
            }
            let mut data = vec![0u8; dlen as usize];
            r.read_exact(&mut data)?;
            Ok(Body::Data { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if req.cmd != CMD_READ {
                return proto("Unexpected structured hole chunk");
            }
            if length != 12 {
                return proto("Protocol error: invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE");
            }
            let offset = read_u64(r)?;
            let len = read_u32(r)?;
            if len == 0 || !inside(req, offset, u64::from(len)) {
                return proto("Protocol error: server sent hole that is outside requested range");
            }
            Ok(Body::Hole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if req.cmd != CMD_BLOCK_STATUS {
                return proto("Unexpected block status chunk");
            }
            if length < 12 || (length - 4) % 8 != 0 {
                return proto("Protocol error: invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS");
            }
            let context = read_u32(r)?;
            let len = read_u32(r)?;
            let flags = read_u32(r)?;
            if len == 0 {
                return proto("Protocol error: server sent status chunk with zero length");
            }
            drain(r, length - 12)?;
            Ok(Body::Status {
                context,
                len,
                flags,
            })
        }
        t if t & (1 << 15) != 0 => {
            if length < 6 {
                return proto("Protocol error: invalid payload for structured error");
            }
            let errno = read_u32(r)?;
            let msglen = u64::from(read_u16(r)?);
            if errno == 0 {
                return proto("Protocol error: server sent structured error with zero error code");
            }
            let extra = if t == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            if msglen > MAX_STRING as u64
                || 6 + msglen + extra > length
                || (t == REPLY_TYPE_ERROR || t == REPLY_TYPE_ERROR_OFFSET)
                    && 6 + msglen + extra != length
            {
                return proto("Protocol error: invalid payload for structured error");
            }
            let mut msg = vec![0u8; msglen as usize];
            r.read_exact(&mut msg)?;
            if t == REPLY_TYPE_ERROR_OFFSET {
                let off = read_u64(r)?;
                if !inside(req, off, 1) {
                    return proto(
                        "Protocol error: server sent error offset outside requested range",
                    );
                }
            } else {
                drain(r, length - 6 - msglen)?;
            }
            Ok(Body::Error {
                errno,
                message: String::from_utf8_lossy(&msg).into_owned(),
            })
        }
        t => proto(format!("Unexpected reply type: {t}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(ty.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    }

    const READ: RequestInfo = RequestInfo {
        cmd: CMD_READ,
        offset: 4096,
        len: 512,
    };

    fn parse(bytes: &[u8]) -> Result<Reply, ReplyError> {
        read_reply(&mut &bytes[..], true, |c| (c == 7).then_some(READ))
    }

    #[test]
    fn data_inside_the_request() {
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend([0xaa; 512]);
        let r = parse(&chunk(1, REPLY_TYPE_OFFSET_DATA, 7, &p)).unwrap();
        assert!(r.done);
        assert!(matches!(r.body, Body::Data { offset: 4096, ref data } if data.len() == 512));
    }

    #[test]
    fn hostile_chunks_are_protocol_errors() {
        let mut p = 4097u64.to_be_bytes().to_vec();
        p.extend([0xaa; 512]);
        assert!(matches!(
            parse(&chunk(1, REPLY_TYPE_OFFSET_DATA, 7, &p)),
            Err(ReplyError::Protocol(_))
        ));
        // Unknown cookie.
        assert!(matches!(
            parse(&chunk(1, REPLY_TYPE_NONE, 8, &[])),
            Err(ReplyError::Protocol(_))
        ));
        // A huge declared length with no data: refused before any allocation.
        let mut v = chunk(1, REPLY_TYPE_OFFSET_DATA, 7, &[]);
        v[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        v.extend(4096u64.to_be_bytes());
        assert!(matches!(parse(&v), Err(ReplyError::Protocol(_))));
        // Hole past the end.
        let mut h = 4096u64.to_be_bytes().to_vec();
        h.extend(513u32.to_be_bytes());
        assert!(matches!(
            parse(&chunk(1, REPLY_TYPE_OFFSET_HOLE, 7, &h)),
            Err(ReplyError::Protocol(_))
        ));
        // Truncated stream.
        assert!(parse(&chunk(1, REPLY_TYPE_OFFSET_DATA, 7, &p)[..30]).is_err());
    }

    #[test]
    fn random_streams_never_panic() {
        // A small xorshift generator: mutations of valid chunks and plain noise.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut p = 4096u64.to_be_bytes().to_vec();
        p.extend([0xaa; 64]);
        let seeds = [
            chunk(1, REPLY_TYPE_OFFSET_DATA, 7, &p),
            chunk(
                0,
                REPLY_TYPE_OFFSET_HOLE,
                7,
                &[0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 1, 0],
            ),
            chunk(1, REPLY_TYPE_ERROR, 7, &[0, 0, 0, 5, 0, 1, b'x']),
            chunk(1, REPLY_TYPE_BLOCK_STATUS, 7, &[0; 20]),
        ];
        for i in 0..20000 {
            let mut v = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % v.len();
                v[at] = next() as u8;
            }
            let mut r = &v[..];
            while read_reply(&mut r, i % 2 == 0, |c| {
                (c == 7).then_some(RequestInfo {
                    cmd: [CMD_READ, CMD_BLOCK_STATUS][(c as usize + i) % 2],
                    ..READ
                })
            })
            .is_ok()
            {}
        }
    }

    #[test]
    fn structured_errors() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend(3u16.to_be_bytes());
        p.extend(b"bad");
        let r = parse(&chunk(1, REPLY_TYPE_ERROR, 7, &p)).unwrap();
        assert_eq!(
            r.body,
            Body::Error {
                errno: 5,
                message: "bad".into()
            }
        );
        p[5] = 200;
        assert!(matches!(
            parse(&chunk(1, REPLY_TYPE_ERROR, 7, &p)),
            Err(ReplyError::Protocol(_))
        ));
    }
}

//! The fixed newstyle handshake, from the client side.
//!
//! The client asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`), selects the
//! `base:allocation` meta context (or the `x-dirty-bitmap` context instead, as QEMU
//! does) with `NBD_OPT_SET_META_CONTEXT`, and enters transmission with `NBD_OPT_GO`
//! asking for `NBD_INFO_BLOCK_SIZE`; servers without `NBD_OPT_GO` get
//! `NBD_OPT_EXPORT_NAME`, and oldstyle servers are accepted. Every option reply's
//! length is bounded before its payload is read. Failures read as QEMU's client words
//! them.

use std::io::{Read, Write};

use crate::error::{Error, Result};

use super::reply::MAX_STRING;

const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
const REP_ERR_PLATFORM: u32 = REP_ERR_BIT + 4;
const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT + 7;
const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT + 8;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server takes FLUSH.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server takes FUA.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the server takes TRIM.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server takes WRITE_ZEROES.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Longest option reply payload read (an INFO or META_CONTEXT reply, or an error
/// message); anything longer is a protocol error.
const MAX_OPT_REPLY: u32 = MAX_STRING as u32 + 64;

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Default)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// The id of the selected meta context, when the server agreed to one.
    pub context_id: Option<u32>,
    /// Minimum block size (0: not advertised).
    pub min_block: u32,
    /// Preferred block size (0: not advertised).
    pub opt_block: u32,
    /// Maximum block size (0: not advertised).
    pub max_block: u32,
}

fn eof_msg(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "Unexpected end-of-file before all data were read".to_string()
    } else {
        format!(
            "Unable to read from socket: {}",
            crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
        )
    }
}

fn rd<const N: usize>(s: &mut impl Read, what: &str) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)
        .map_err(|e| Error::other(format!("{what}: {}", eof_msg(&e)), libc::EIO))?;
    Ok(b)
}

fn send(s: &mut impl Write, data: &[u8]) -> Result<()> {
    s.write_all(data).map_err(|e| {
        Error::other(
            format!(
                "Failed to send option request: Unable to write to socket: {}",
                crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ),
            libc::EIO,
        )
    })
}

fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) -> Result<()> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend(OPTS_MAGIC.to_be_bytes());
    v.extend(opt.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    send(s, &v)
}

fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        3 => "list",
        5 => "starttls",
        6 => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        9 => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        11 => "extended headers",
        _ => "<unknown>",
    }
}

fn proto_err(msg: impl Into<String>) -> Error {
    Error::other(msg.into(), libc::EINVAL)
}

/// One option reply: its type and payload (bounded by [`MAX_OPT_REPLY`]).
fn read_opt_reply(s: &mut impl Read, opt: u32) -> Result<(u32, Vec<u8>)> {
    let h: [u8; 20] = rd(s, "Failed to read option reply")?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let ropt = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if magic != REP_MAGIC {
        return Err(proto_err("Unexpected option reply magic"));
    }
    if ropt != opt {
        return Err(proto_err(format!(
            "Unexpected option type {ropt} ({}), expected {opt} ({})",
            opt_name(ropt),
            opt_name(opt)
        )));
    }
    if len > MAX_OPT_REPLY {
        return Err(proto_err(format!(
            "server's reply to option {opt} ({}) is too long",
            opt_name(opt)
        )));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).map_err(|e| {
        Error::other(
            format!("Failed to read option reply: {}", eof_msg(&e)),
            libc::EIO,
        )
    })?;
    Ok((ty, payload))
}

/// The error for an error reply, in QEMU's words (`None` for `NBD_REP_ERR_UNSUP`,
/// which callers handle by falling back).
fn reply_error(opt: u32, ty: u32, payload: &[u8]) -> Option<Error> {
    let o = format!("{opt} ({})", opt_name(opt));
    let msg = match ty {
        REP_ERR_UNSUP => return None,
        REP_ERR_POLICY => format!("Denied by server for option {o}"),
        REP_ERR_INVALID => format!("Server rejected invalid request for option {o}"),
        REP_ERR_PLATFORM => format!("Server lacks support for option {o}"),
        REP_ERR_TLS_REQD => format!("TLS negotiation required before option {o}"),
        REP_ERR_UNKNOWN => "Requested export not available".to_string(),
        REP_ERR_SHUTDOWN => format!("Server shutting down before option {o}"),
        REP_ERR_BLOCK_SIZE_REQD => format!("Server requires INFO_BLOCK_SIZE for option {o}"),
        _ => format!("Unknown error code when asking for option {o}"),
    };
    let mut msg = msg;
    if !payload.is_empty() {
        msg.push_str(&format!(
            "\nserver reported: {}",
            String::from_utf8_lossy(payload)
        ));
    }
    Some(proto_err(msg))
}

/// Negotiates the export `name` over `s`; `context` is the meta context to select
/// (`base:allocation`, or the `x-dirty-bitmap` name).
pub fn negotiate<S: Read + Write>(s: &mut S, name: &str, context: &str) -> Result<ExportInfo> {
    let magic = u64::from_be_bytes(rd(s, "Failed to read initial magic")?);
    if magic != INIT_MAGIC {
        return Err(proto_err(format!("Bad initial magic received: {magic:#x}")));
    }
    let magic = u64::from_be_bytes(rd(s, "Failed to read server magic")?);
    if magic == OLDSTYLE_MAGIC {
        if !name.is_empty() {
            return Err(proto_err("Server does not support non-empty export names"));
        }
        let size = u64::from_be_bytes(rd(s, "Failed to read export length")?);
        let flags = u32::from_be_bytes(rd(s, "Failed to read export flags")?);
        let _: [u8; 124] = rd(s, "Failed to read reserved block")?;
        return finish(ExportInfo {
            size,
            flags: flags as u16,
            ..Default::default()
        });
    }
    if magic != OPTS_MAGIC {
        return Err(proto_err(format!("Bad server magic received: {magic:#x}")));
    }
    let gflags = u16::from_be_bytes(rd(s, "Failed to read server flags")?);
    let fixed = gflags & FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = gflags & FLAG_NO_ZEROES != 0;
    let cflags = u32::from(gflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    send(s, &cflags.to_be_bytes())?;
    if name.len() > MAX_STRING {
        return Err(proto_err("export name too long to send to server"));
    }
    let r = options(s, name, context, fixed, no_zeroes);
    if r.is_err() && fixed {
        // Tell the server we are leaving, as QEMU does (the reply is not awaited).
        let _ = send_option(s, OPT_ABORT, &[]);
    }
    r
}

/// The option haggling phase, after the greeting.
fn options<S: Read + Write>(
    s: &mut S,
    name: &str,
    context: &str,
    fixed: bool,
    no_zeroes: bool,
) -> Result<ExportInfo> {
    let mut info = ExportInfo::default();
    if fixed {
        send_option(s, OPT_STRUCTURED_REPLY, &[])?;
        let (ty, payload) = read_opt_reply(s, OPT_STRUCTURED_REPLY)?;
        match ty {
            REP_ACK => info.structured = true,
            t if t & REP_ERR_BIT != 0 => {
                if let Some(e) = reply_error(OPT_STRUCTURED_REPLY, t, &payload) {
                    return Err(e);
                }
            }
            _ => return Err(proto_err("Unexpected reply to structured reply option")),
        }
        if info.structured {
            info.context_id = set_meta_context(s, name, context)?;
        }
        if go(s, name, &mut info)? {
            return finish(info);
        }
    }
    // NBD_OPT_EXPORT_NAME: the server answers with the export's size and flags, or
    // closes the connection.
    send_option(s, OPT_EXPORT_NAME, name.as_bytes())?;
    let size = u64::from_be_bytes(rd(s, "Failed to read export length")?);
    info.size = size;
    info.flags = u16::from_be_bytes(rd(s, "Failed to read export flags")?);
    if !no_zeroes {
        let _: [u8; 124] = rd(s, "Failed to read reserved block")?;
    }
    finish(info)
}

fn finish(info: ExportInfo) -> Result<ExportInfo> {
    if info.size > i64::MAX as u64 {
        return Err(proto_err("export size too large"));
    }
    Ok(info)
}

fn set_meta_context<S: Read + Write>(s: &mut S, name: &str, context: &str) -> Result<Option<u32>> {
    let mut data = Vec::new();
    data.extend((name.len() as u32).to_be_bytes());
    data.extend(name.as_bytes());
    data.extend(1u32.to_be_bytes());
    data.extend((context.len() as u32).to_be_bytes());
    data.extend(context.as_bytes());
    send_option(s, OPT_SET_META_CONTEXT, &data)?;
    let mut id = None;
    loop {
        let (ty, payload) = read_opt_reply(s, OPT_SET_META_CONTEXT)?;
        match ty {
            REP_ACK => {
                if !payload.is_empty() {
                    return Err(proto_err(
                        "server's reply to option 10 (set meta context) has wrong length",
                    ));
                }
                return Ok(id);
            }
            REP_META_CONTEXT => {
                if payload.len() < 4 {
                    return Err(proto_err("Invalid meta context reply"));
                }
                let cid = u32::from_be_bytes(payload[..4].try_into().unwrap_or_default());
                if &payload[4..] != context.as_bytes() {
                    return Err(proto_err(format!(
                        "Unexpected context name: {}",
                        String::from_utf8_lossy(&payload[4..])
                    )));
                }
                if id.is_some() {
                    return Err(proto_err("Server replied with more than one context"));
                }
                id = Some(cid);
            }
            t if t & REP_ERR_BIT != 0 => {
                // A server that cannot select contexts still serves data.
                if let Some(e) = reply_error(OPT_SET_META_CONTEXT, t, &payload) {
                    if t != REP_ERR_POLICY && t != REP_ERR_INVALID {
                        return Err(e);
                    }
                }
                return Ok(None);
            }
            _ => return Err(proto_err("Unexpected reply type to set meta context")),
        }
    }
}

/// `NBD_OPT_GO`; `Ok(false)` when the server does not know the option.
fn go<S: Read + Write>(s: &mut S, name: &str, info: &mut ExportInfo) -> Result<bool> {
    let mut data = Vec::new();
    data.extend((name.len() as u32).to_be_bytes());
    data.extend(name.as_bytes());
    data.extend(1u16.to_be_bytes());
    data.extend(INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut have_export = false;
    loop {
        let (ty, payload) = read_opt_reply(s, OPT_GO)?;
        match ty {
            REP_ACK => {
                if !have_export {
                    return Err(proto_err("broken server omitted NBD_INFO_EXPORT"));
                }
                return Ok(true);
            }
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(proto_err("Info reply too short"));
                }
                let it = u16::from_be_bytes([payload[0], payload[1]]);
                let be32 =
                    |i: usize| u32::from_be_bytes(payload[i..i + 4].try_into().unwrap_or_default());
                match it {
                    INFO_EXPORT => {
                        if payload.len() != 12 {
                            return Err(proto_err(
                                "remaining export info len 10 is unexpected size",
                            ));
                        }
                        info.size =
                            u64::from_be_bytes(payload[2..10].try_into().unwrap_or_default());
                        info.flags = u16::from_be_bytes([payload[10], payload[11]]);
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE => {
                        if payload.len() != 14 {
                            return Err(proto_err("remaining export info len is unexpected size"));
                        }
                        let (min, opt, max) = (be32(2), be32(6), be32(10));
                        if !min.is_power_of_two() || min > 65536 {
                            return Err(proto_err(format!(
                                "server minimum block size {min} is not a power of two"
                            )));
                        }
                        if !opt.is_power_of_two() || opt < min {
                            return Err(proto_err(format!(
                                "server preferred block size {opt} is not valid"
                            )));
                        }
                        if max < opt.min(32 << 20) || max % min != 0 {
                            return Err(proto_err(format!(
                                "server maximum block size {max} is not valid"
                            )));
                        }
                        info.min_block = min;
                        info.opt_block = opt;
                        info.max_block = max;
                    }
                    _ => {}
                }
            }
            t if t & REP_ERR_BIT != 0 => {
                return match reply_error(OPT_GO, t, &payload) {
                    None => Ok(false),
                    Some(e) => Err(e),
                };
            }
            _ => return Err(proto_err("unexpected reply type to NBD_OPT_GO")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        input: std::io::Cursor<Vec<u8>>,
        out: Vec<u8>,
    }
    impl Read for Fake {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Fake {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.out.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn truncated_and_bad_magic() {
        let mut f = Fake {
            input: std::io::Cursor::new(b"NBD".to_vec()),
            out: vec![],
        };
        let e = negotiate(&mut f, "", "base:allocation").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Failed to read initial magic: Unexpected end-of-file before all data were read"
        );
        let mut f = Fake {
            input: std::io::Cursor::new(b"NBDMAGIX".to_vec()),
            out: vec![],
        };
        let e = negotiate(&mut f, "", "base:allocation").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bad initial magic received: 0x4e42444d41474958"
        );
    }

    /// A server's whole side of a successful handshake.
    fn good_transcript() -> Vec<u8> {
        let rep = |opt: u32, ty: u32, p: &[u8]| {
            let mut v = REP_MAGIC.to_be_bytes().to_vec();
            v.extend(opt.to_be_bytes());
            v.extend(ty.to_be_bytes());
            v.extend((p.len() as u32).to_be_bytes());
            v.extend(p);
            v
        };
        let mut v = INIT_MAGIC.to_be_bytes().to_vec();
        v.extend(OPTS_MAGIC.to_be_bytes());
        v.extend(3u16.to_be_bytes());
        v.extend(rep(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let mut m = 1u32.to_be_bytes().to_vec();
        m.extend(b"base:allocation");
        v.extend(rep(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &m));
        v.extend(rep(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        let mut i = INFO_EXPORT.to_be_bytes().to_vec();
        i.extend((1u64 << 20).to_be_bytes());
        i.extend(1u16.to_be_bytes());
        v.extend(rep(OPT_GO, REP_INFO, &i));
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for x in [1u32, 4096, 1 << 25] {
            b.extend(x.to_be_bytes());
        }
        v.extend(rep(OPT_GO, REP_INFO, &b));
        v.extend(rep(OPT_GO, REP_ACK, &[]));
        v
    }

    #[test]
    fn a_good_handshake_and_its_mutations() {
        let mut f = Fake {
            input: std::io::Cursor::new(good_transcript()),
            out: vec![],
        };
        let info = negotiate(&mut f, "", "base:allocation").unwrap();
        assert_eq!(
            (info.size, info.context_id, info.max_block),
            (1 << 20, Some(1), 1 << 25)
        );
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20000 {
            let mut v = good_transcript();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % v.len();
                v[at] = next() as u8;
            }
            let mut f = Fake {
                input: std::io::Cursor::new(v),
                out: vec![],
            };
            let _ = negotiate(&mut f, "", "base:allocation");
        }
    }

    #[test]
    fn huge_option_reply_is_refused() {
        let mut inp = Vec::new();
        inp.extend(INIT_MAGIC.to_be_bytes());
        inp.extend(OPTS_MAGIC.to_be_bytes());
        inp.extend(3u16.to_be_bytes());
        inp.extend(REP_MAGIC.to_be_bytes());
        inp.extend(OPT_STRUCTURED_REPLY.to_be_bytes());
        inp.extend(REP_ACK.to_be_bytes());
        inp.extend(u32::MAX.to_be_bytes());
        let mut f = Fake {
            input: std::io::Cursor::new(inp),
            out: vec![],
        };
        assert!(negotiate(&mut f, "", "base:allocation").is_err());
    }
}

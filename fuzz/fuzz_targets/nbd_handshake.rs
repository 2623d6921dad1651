//! Fuzzes the NBD client's handshake against a scripted server: the fuzzer plays the
//! server side of the newstyle negotiation (or an oldstyle greeting), answering each
//! option the client sends with replies built from the input (right or wrong option,
//! magic and length; ACK, INFO, META_CONTEXT, every error type, unknown types, raw
//! bytes). The client must end in a clean error or an export it can use, send only
//! well-formed options, never panic, hang or allocate beyond a reply's bound.
#![no_main]

use std::collections::VecDeque;
use std::io::{Read, Write};

use libfuzzer_sys::fuzz_target;
use rqemu_block::protocol::nbd::handshake::negotiate;

const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ERR_BIT: u32 = 1 << 31;

/// The server: replies come from `script` as the client's options arrive.
struct Server<'a> {
    script: &'a [u8],
    to_client: VecDeque<u8>,
    from_client: Vec<u8>,
    /// The greeting offered the newstyle options phase (client flags expected next).
    newstyle: bool,
    server_flags: u16,
    client_flags_seen: bool,
    name: &'a str,
    context: &'a str,
    /// Options the client sent, in order.
    sent: Vec<u32>,
    one_byte_reads: bool,
    /// The greeting was raw script bytes: the client's replies are not checked.
    unchecked: bool,
}

impl Server<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.script.split_first()?;
        self.script = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.script.split_at(n.min(self.script.len()));
        self.script = b;
        a
    }

    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_be_bytes(b)
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let t = self.take(8);
        b[..t.len()].copy_from_slice(t);
        u64::from_be_bytes(b)
    }

    fn send(&mut self, b: &[u8]) {
        self.to_client.extend(b);
    }

    /// A raw run of script bytes, for anything the structured replies cannot say.
    fn raw(&mut self) {
        let n = self.byte().unwrap_or(0) as usize;
        let t = self.take(n).to_vec();
        self.send(&t);
    }

    fn greet(&mut self) {
        self.send(&INIT_MAGIC.to_be_bytes());
        match self.byte().unwrap_or(0) % 4 {
            0 | 1 => {
                self.newstyle = true;
                let f = u16::from(self.byte().unwrap_or(3)) & 3;
                self.server_flags = f;
                self.send(&OPTS_MAGIC.to_be_bytes());
                self.send(&f.to_be_bytes());
            }
            2 => {
                // Oldstyle: size, flags, 124 reserved bytes (or whatever the script says).
                self.send(&OLDSTYLE_MAGIC.to_be_bytes());
                let size = self.u64();
                self.send(&size.to_be_bytes());
                let flags = self.u32();
                self.send(&flags.to_be_bytes());
                self.send(&[0; 124]);
            }
            _ => {
                self.unchecked = true;
                self.raw();
            }
        }
    }

    /// Checks the client's bytes so far and answers every complete option.
    fn client_wrote(&mut self) {
        if self.newstyle && !self.client_flags_seen {
            if self.from_client.len() < 4 {
                return;
            }
            let f: Vec<u8> = self.from_client.drain(..4).collect();
            let f = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
            assert_eq!(f & !u32::from(self.server_flags), 0, "client flags {f:#x}");
            self.client_flags_seen = true;
        }
        while self.from_client.len() >= 16 {
            let h = &self.from_client[..16];
            let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
            let opt = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
            assert_eq!(magic, OPTS_MAGIC);
            assert!(
                len <= 4 + 4096 + 4 + 4 + 4096,
                "option {opt} of {len} bytes"
            );
            if self.from_client.len() < 16 + len {
                return;
            }
            let data: Vec<u8> = self.from_client.drain(..16 + len).skip(16).collect();
            assert!(self.server_flags & 1 != 0 || opt == OPT_EXPORT_NAME);
            assert!(!self.sent.contains(&opt), "option {opt} sent twice");
            assert!(!self.sent.contains(&OPT_ABORT), "option {opt} after abort");
            self.sent.push(opt);
            self.check_option(opt, &data);
            self.answer(opt);
        }
    }

    fn check_option(&self, opt: u32, data: &[u8]) {
        let be32 = |d: &[u8], i: usize| {
            u32::from_be_bytes(d[i..i + 4].try_into().expect("4 bytes")) as usize
        };
        match opt {
            OPT_EXPORT_NAME => assert_eq!(data, self.name.as_bytes()),
            OPT_ABORT | OPT_STRUCTURED_REPLY => assert!(data.is_empty()),
            OPT_GO | OPT_SET_META_CONTEXT => {
                let n = be32(data, 0);
                assert_eq!(&data[4..4 + n], self.name.as_bytes());
                let rest = &data[4 + n..];
                if opt == OPT_GO {
                    assert_eq!(rest, &[0, 1, 0, 3]);
                } else {
                    assert_eq!(be32(rest, 0), 1);
                    assert_eq!(be32(rest, 4), self.context.len());
                    assert_eq!(&rest[8..], self.context.as_bytes());
                }
            }
            _ => panic!("unexpected option {opt}"),
        }
    }

    fn reply(&mut self, opt: u32, ty: u32, payload: &[u8], ctl: u8) {
        let magic = if ctl & 0x20 != 0 {
            REP_MAGIC ^ 1
        } else {
            REP_MAGIC
        };
        let ropt = if ctl & 0x10 != 0 { opt ^ 2 } else { opt };
        let len = if ctl & 0x40 != 0 {
            self.u32()
        } else {
            payload.len() as u32
        };
        self.send(&magic.to_be_bytes());
        self.send(&ropt.to_be_bytes());
        self.send(&ty.to_be_bytes());
        self.send(&len.to_be_bytes());
        self.send(payload);
    }

    fn answer(&mut self, opt: u32) {
        match opt {
            OPT_ABORT => {}
            OPT_EXPORT_NAME => {
                let ctl = self.byte().unwrap_or(0);
                if ctl & 1 != 0 {
                    return self.raw();
                }
                let size = self.u64();
                self.send(&size.to_be_bytes());
                let flags = self.take(2).to_vec();
                self.send(&flags);
                if self.server_flags & 2 == 0 || ctl & 2 != 0 {
                    self.send(&[0; 124]);
                }
            }
            _ => loop {
                let Some(ctl) = self.byte() else {
                    return;
                };
                if ctl == 0xff {
                    return self.raw();
                }
                let (ty, payload): (u32, Vec<u8>) = match ctl & 0x0f {
                    0 => (1, vec![]),
                    1 => {
                        let mut p = vec![0, 0];
                        p.extend(self.u64().to_be_bytes());
                        p.extend(self.take(2));
                        (3, p)
                    }
                    2 => {
                        let mut p = vec![0, 3];
                        for _ in 0..3 {
                            let b = self.byte().unwrap_or(0);
                            let v = if b & 0x80 != 0 {
                                self.u32()
                            } else {
                                1u32 << (b & 31)
                            };
                            p.extend(v.to_be_bytes());
                        }
                        (3, p)
                    }
                    3 => {
                        let n = self.byte().unwrap_or(0) as usize;
                        (3, self.take(n).to_vec())
                    }
                    4 => {
                        let mut p = self.take(4).to_vec();
                        p.extend(self.context.as_bytes());
                        (4, p)
                    }
                    5 => {
                        let n = self.byte().unwrap_or(0) as usize;
                        (4, self.take(n).to_vec())
                    }
                    e @ 6..=13 => {
                        let n = self.byte().unwrap_or(0) as usize % 32;
                        (REP_ERR_BIT + u32::from(e) - 5, self.take(n).to_vec())
                    }
                    14 => (REP_ERR_BIT | self.u32(), vec![]),
                    _ => (self.u32(), vec![]),
                };
                self.reply(opt, ty, &payload, ctl);
                if ctl & 0x80 == 0 {
                    return;
                }
            },
        }
    }
}

impl Read for Server<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let want = if self.one_byte_reads { 1 } else { b.len() };
        let n = want.min(b.len()).min(self.to_client.len());
        for (dst, src) in b.iter_mut().zip(self.to_client.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if !self.unchecked {
            self.from_client.extend_from_slice(b);
            self.client_wrote();
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, script)) = data.split_first() else {
        return;
    };
    let long = "x".repeat(4096 + usize::from(mode & 3 == 3));
    let name = match mode & 3 {
        0 => "",
        1 => "exp",
        _ => long.as_str(),
    };
    let context = if mode & 4 != 0 {
        "qemu:dirty-bitmap:bm"
    } else {
        "base:allocation"
    };
    let mut s = Server {
        script,
        to_client: VecDeque::new(),
        from_client: Vec::new(),
        newstyle: false,
        server_flags: 0,
        client_flags_seen: false,
        name,
        context,
        sent: Vec::new(),
        one_byte_reads: mode & 8 != 0,
        unchecked: false,
    };
    s.greet();
    let r = negotiate(&mut s, name, context);
    assert!(s.from_client.is_empty(), "a partial option left unsent");
    match r {
        Ok(info) => {
            assert!(name.len() <= 4096);
            assert!(info.size <= i64::MAX as u64);
            assert!(s.unchecked || !s.sent.contains(&OPT_ABORT));
            assert!(info.context_id.is_none() || info.structured);
            if info.min_block != 0 {
                assert!(info.min_block.is_power_of_two() && info.min_block <= 65536);
                assert!(info.opt_block.is_power_of_two() && info.opt_block >= info.min_block);
                assert_eq!(info.max_block % info.min_block, 0);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

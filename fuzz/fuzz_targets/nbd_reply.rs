//! Fuzzes the NBD client's parsers of server bytes: a stream of replies (simple and
//! structured chunks) read against a table of requests in flight, and the handshake
//! (greeting and option replies). Any input must give replies or an error: never a
//! panic, a hang or an allocation beyond what a request asked for.
#![no_main]

use std::io::{Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use rqemu_block::protocol::nbd::handshake::negotiate;
use rqemu_block::protocol::nbd::reply::{
    read_reply, Body, RequestInfo, CMD_BLOCK_STATUS, CMD_READ, CMD_WRITE,
};

/// Server bytes in, client bytes thrown away.
struct Fake(Cursor<Vec<u8>>);

impl Read for Fake {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Fake {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn lookup(cookie: u64) -> Option<RequestInfo> {
    let (cmd, offset, len) = match cookie {
        1 => (CMD_READ, 0, 65536),
        2 => (CMD_READ, 1 << 40, 512),
        3 => (CMD_BLOCK_STATUS, 4096, 1 << 20),
        4 => (CMD_WRITE, 0, 4096),
        _ => return None,
    };
    Some(RequestInfo { cmd, offset, len })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut r = rest;
        let structured = mode & 2 != 0;
        while let Ok(reply) = read_reply(&mut r, structured, lookup) {
            let req = lookup(reply.cookie).expect("replies name requests in flight");
            match reply.body {
                Body::Data { offset, data } => {
                    assert!(offset >= req.offset);
                    assert!(offset + data.len() as u64 <= req.offset + u64::from(req.len));
                }
                Body::Hole { offset, len } => {
                    assert!(offset >= req.offset);
                    assert!(offset + u64::from(len) <= req.offset + u64::from(req.len));
                }
                Body::Status { len, .. } => assert!(len > 0),
                Body::Error { errno, .. } => assert!(errno != 0),
                Body::Ok => {}
            }
        }
    } else {
        let mut s = Fake(Cursor::new(rest.to_vec()));
        let _ = negotiate(&mut s, "exp", "base:allocation");
    }
});

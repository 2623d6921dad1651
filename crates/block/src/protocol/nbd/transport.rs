//! Transmission: requests on one connection, many in flight, replies dispatched by
//! cookie.
//!
//! Requests are written whole (header and data) under a lock on the socket's write
//! side. A reader thread owns the read side: it parses each reply with
//! [`read_reply`] against the table of requests in flight and hands it to the waiting
//! request through a channel. When the connection fails or a reply breaks the protocol,
//! every waiting request and every later one fails with EIO and the reason.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::error::{Error, Result};

use super::addr::Stream;
use super::reply::{read_reply, Body, Reply, ReplyError, RequestInfo, CMD_DISC};

const REQUEST_MAGIC: u32 = 0x2560_9513;

/// Requests in flight at once (QEMU's `MAX_NBD_REQUESTS`).
const MAX_IN_FLIGHT: usize = 16;

enum Event {
    Reply(Reply),
    Failed(String),
}

struct Pending {
    req: RequestInfo,
    tx: UnboundedSender<Event>,
    /// Bytes of data and holes received for it.
    received: u64,
    /// Other chunks received for it.
    chunks: u32,
}

/// Chunks other than data and holes one request may receive.
const MAX_OTHER_CHUNKS: u32 = 64;

impl Pending {
    /// Counts a chunk: a server that sends more than the request asked for (overlapping
    /// data, endless error chunks) breaks the protocol, and is not buffered for.
    fn account(&mut self, body: &Body) -> Result<(), ReplyError> {
        let n = match body {
            Body::Data { data, .. } => data.len() as u64,
            Body::Hole { len, .. } => u64::from(*len),
            _ => {
                self.chunks += 1;
                if self.chunks > MAX_OTHER_CHUNKS {
                    return Err(ReplyError::Protocol(
                        "Protocol error: too many reply chunks".into(),
                    ));
                }
                return Ok(());
            }
        };
        self.received += n;
        if self.received > u64::from(self.req.len) {
            return Err(ReplyError::Protocol(
                "Protocol error: server sent more data than requested".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection in transmission phase.
pub struct Connection {
    writer: Mutex<Stream>,
    state: Arc<Mutex<State>>,
    slots: tokio::sync::Semaphore,
    next_cookie: AtomicU64,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The host errno for an NBD error number.
pub fn host_errno(nbd: u32) -> i32 {
    match nbd {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::ENOTSUP,
        108 => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

fn failed(msg: &str) -> Error {
    Error::other(msg.to_string(), libc::EIO)
}

impl Connection {
    /// Starts transmission on a negotiated stream.
    pub fn new(stream: Stream, structured: bool) -> Result<Connection> {
        let mut rstream = stream.try_clone().map_err(|e| Error::from_io(&e))?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || loop {
                let r = read_reply(&mut rstream, structured, |c| {
                    lock(&st).pending.get(&c).map(|p| p.req)
                });
                let mut s = lock(&st);
                let r = r.and_then(|reply| match s.pending.get_mut(&reply.cookie) {
                    Some(p) => p.account(&reply.body).map(|()| reply),
                    None => Ok(reply),
                });
                match r {
                    Ok(reply) => {
                        let cookie = reply.cookie;
                        let p = if reply.done {
                            s.pending.remove(&cookie)
                        } else {
                            None
                        };
                        let tx = p
                            .as_ref()
                            .map(|p| &p.tx)
                            .or(s.pending.get(&cookie).map(|p| &p.tx));
                        if let Some(tx) = tx {
                            // The request may have been abandoned; its reply is dropped.
                            let _ = tx.send(Event::Reply(reply));
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for (_, p) in s.pending.drain() {
                            let _ = p.tx.send(Event::Failed(msg.clone()));
                        }
                        s.dead = Some(msg);
                        return;
                    }
                }
            })
            .map_err(|e| Error::from_io(&e))?;
        Ok(Connection {
            writer: Mutex::new(stream),
            state,
            slots: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            next_cookie: AtomicU64::new(1),
            reader: Mutex::new(Some(reader)),
        })
    }

    fn send(&self, header: &[u8], data: Option<&[u8]>) -> std::io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(header)?;
        if let Some(d) = data {
            w.write_all(d)?;
        }
        Ok(())
    }

    fn header(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// Sends a request and feeds each successful reply chunk to `f` until the reply is
    /// done. The first error (the server's or `f`'s) is the result.
    pub async fn call(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        mut f: impl FnMut(Body) -> Result<()> + Send,
    ) -> Result<()> {
        let _permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| failed("Connection closed"))?;
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = unbounded_channel();
        {
            let mut s = lock(&self.state);
            if let Some(m) = &s.dead {
                return Err(failed(m));
            }
            let req = RequestInfo { cmd, offset, len };
            s.pending.insert(
                cookie,
                Pending {
                    req,
                    tx,
                    received: 0,
                    chunks: 0,
                },
            );
        }
        if let Err(e) = self.send(&Self::header(cmd, flags, cookie, offset, len), data) {
            let msg = format!(
                "Failed to send request: {}",
                crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            );
            {
                let mut s = lock(&self.state);
                s.pending.remove(&cookie);
                s.dead.get_or_insert_with(|| msg.clone());
            }
            // A request may have gone out in part: nothing more can follow it.
            self.writer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown();
            return Err(failed(&msg));
        }
        let mut err: Option<Error> = None;
        loop {
            match rx.recv().await {
                None => return Err(failed("Connection closed")),
                Some(Event::Failed(m)) => return Err(failed(&m)),
                Some(Event::Reply(r)) => {
                    match r.body {
                        Body::Error { errno, .. } => {
                            if err.is_none() {
                                err = Some(Error::errno(host_errno(errno)));
                            }
                        }
                        b => {
                            if err.is_none() {
                                if let Err(e) = f(b) {
                                    err = Some(e);
                                }
                            }
                        }
                    }
                    if r.done {
                        break;
                    }
                }
            }
        }
        err.map_or(Ok(()), Err)
    }

    /// Whether the connection failed (every request on it fails).
    pub fn is_dead(&self) -> bool {
        lock(&self.state).dead.is_some()
    }

    /// Sends `NBD_CMD_DISC` (unless the connection already failed), shuts the socket
    /// down and waits for the reader.
    pub fn close(&self) {
        let dead = lock(&self.state).dead.is_some();
        if !dead && self.send(&Self::header(CMD_DISC, 0, 0, 0, 0), None).is_ok() {
            // Give the server a moment to hang up first, so that it is done with the
            // export when the client is.
            let t = std::time::Instant::now();
            while lock(&self.state).dead.is_none()
                && t.elapsed() < std::time::Duration::from_secs(1)
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
        let h = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // A connection dropped without `close` (a graph that failed to open) still
        // says goodbye.
        let open = self
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if open && !self.is_dead() {
            let _ = self.send(&Self::header(CMD_DISC, 0, 0, 0, 0), None);
        }
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown();
    }
}

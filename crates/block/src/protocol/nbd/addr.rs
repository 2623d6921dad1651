//! Where the server is: QEMU's NBD filenames and options, and connecting.
//!
//! Filenames: `nbd://host[:port]/export` (also `nbd+tcp://`),
//! `nbd+unix:///export?socket=PATH`, `nbd:unix:PATH[:exportname=E]` and
//! `nbd:HOST:PORT[:exportname=E]`. Options: `server.type=unix,server.path=` or
//! `server.type=inet,server.host=,server.port=`, the legacy `path`/`host`/`port`,
//! `export` and `x-dirty-bitmap`. Errors are QEMU's.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;

use rqemu_opts::KeyVal;

use crate::error::{Error, Result};

/// NBD's IANA port.
pub const DEFAULT_PORT: u16 = 10809;

/// A server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// A unix socket path.
    Unix(String),
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port (as given).
        port: String,
    },
}

/// How to reach an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// The server.
    pub server: ServerAddr,
    /// The export name (`None`: the default, empty name).
    pub export: Option<String>,
    /// A meta context to report as block status instead of `base:allocation`.
    pub x_dirty_bitmap: Option<String>,
    /// Seconds to keep trying to connect (`open-timeout`; 0: one attempt).
    pub open_timeout: u64,
    /// Seconds requests wait for a lost connection to come back (`reconnect-delay`).
    pub reconnect_delay: u64,
}

impl NbdOptions {
    /// The filename QEMU shows for the node.
    pub fn display_name(&self) -> String {
        match (&self.server, &self.export) {
            (ServerAddr::Unix(p), Some(e)) => format!("nbd+unix:///{e}?socket={p}"),
            (ServerAddr::Unix(p), None) => format!("nbd+unix://?socket={p}"),
            (ServerAddr::Inet { host, port }, Some(e)) => format!("nbd://{host}:{port}/{e}"),
            (ServerAddr::Inet { host, port }, None) => format!("nbd://{host}:{port}"),
        }
    }

    /// Takes the NBD driver's options out of `kv` (with `filename`, if not empty, parsed
    /// into them first). Unknown options are left in `kv` for the caller to refuse.
    pub fn take_from(filename: &str, kv: &mut KeyVal) -> Result<NbdOptions> {
        if !filename.is_empty() {
            for k in kv.keys() {
                if matches!(k, "host" | "port" | "path" | "export") || k.starts_with("server.") {
                    return Err(Error::invalid(format!(
                        "Option '{k}' cannot be used with a file name"
                    )));
                }
            }
            parse_filename(filename, kv)?;
        }
        let path = kv.take("path");
        let host = kv.take("host");
        let port = kv.take("port");
        let export = kv.take("export");
        let x_dirty_bitmap = kv.take("x-dirty-bitmap");
        if let Some(id) = kv.take("tls-creds") {
            return Err(Error::invalid(format!("No TLS credentials with id '{id}'")));
        }
        kv.take("tls-hostname");
        let mut numbers = [0u64; 2];
        for (i, k) in ["reconnect-delay", "open-timeout"].into_iter().enumerate() {
            if let Some(v) = kv.take(k) {
                numbers[i] = v
                    .parse::<u64>()
                    .map_err(|_| Error::invalid(format!("Parameter '{k}' expects a number")))?;
            }
        }
        let [reconnect_delay, open_timeout] = numbers;
        if path.is_some() || host.is_some() || port.is_some() {
            if kv.keys().any(|k| k.starts_with("server.")) {
                return Err(Error::invalid(
                    "Cannot use 'server' and path/host/port at the same time",
                ));
            }
            match (path, host) {
                (Some(_), Some(_)) => {
                    return Err(Error::invalid(
                        "path and host may not be used at the same time",
                    ))
                }
                (Some(p), None) => {
                    if port.is_some() {
                        return Err(Error::invalid("port may not be used without host"));
                    }
                    kv.set("server.type", "unix");
                    kv.set("server.path", &p);
                }
                (None, Some(h)) => {
                    kv.set("server.type", "inet");
                    kv.set("server.host", &h);
                    kv.set(
                        "server.port",
                        &port.unwrap_or_else(|| DEFAULT_PORT.to_string()),
                    );
                }
                (None, None) => {}
            }
        }
        let mut server = kv.take_child("server");
        if server.is_empty() {
            return Err(Error::invalid("NBD server address missing"));
        }
        let missing = |k: &str| Error::invalid(format!("Parameter '{k}' is missing"));
        let ty = server.take("type").ok_or_else(|| missing("type"))?;
        let addr = match ty.as_str() {
            "unix" => {
                let p = server.take("path").ok_or_else(|| missing("path"))?;
                server.take("abstract");
                server.take("tight");
                ServerAddr::Unix(p)
            }
            "inet" => {
                let host = server.take("host").ok_or_else(|| missing("host"))?;
                let port = server.take("port").ok_or_else(|| missing("port"))?;
                for k in ["numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"] {
                    server.take(k);
                }
                ServerAddr::Inet { host, port }
            }
            other => {
                return Err(Error::invalid(format!(
                    "Parameter 'type' does not accept value '{other}'"
                )))
            }
        };
        if let Some(k) = server.keys().next() {
            return Err(Error::invalid(format!("Parameter '{k}' is unexpected")));
        }
        if export
            .as_ref()
            .is_some_and(|e| e.len() > super::reply::MAX_STRING)
        {
            return Err(Error::invalid("export name too long to send to server"));
        }
        if x_dirty_bitmap
            .as_ref()
            .is_some_and(|e| e.len() > super::reply::MAX_STRING)
        {
            return Err(Error::invalid(
                "x-dirty-bitmap query too long to send to server",
            ));
        }
        Ok(NbdOptions {
            server: addr,
            export,
            x_dirty_bitmap,
            open_timeout,
            reconnect_delay,
        })
    }
}

/// Whether `name` is one of NBD's filenames.
pub fn is_nbd_filename(name: &str) -> bool {
    name.starts_with("nbd:") || name.starts_with("nbd+unix:") || name.starts_with("nbd+tcp:")
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn invalid_url() -> Error {
    Error::invalid("No valid URL specified")
}

/// Parses a URL into `kv` as QEMU's `nbd_parse_uri` does.
fn parse_uri(url: &str, kv: &mut KeyVal) -> Result<()> {
    let (scheme, rest) = url.split_once("://").ok_or_else(invalid_url)?;
    let is_unix = match scheme {
        "nbd" | "nbd+tcp" => false,
        "nbd+unix" => true,
        _ => return Err(invalid_url()),
    };
    let rest = rest.split_once('#').map_or(rest, |(a, _)| a);
    let (rest, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = percent_decode(path).ok_or_else(invalid_url)?;
    let export = path.strip_prefix('/').unwrap_or(&path);
    if !export.is_empty() {
        kv.set("export", export);
    }
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(invalid_url)?;
        match after.strip_prefix(':') {
            Some(p) => (h.to_string(), Some(p)),
            None if after.is_empty() => (h.to_string(), None),
            None => return Err(invalid_url()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let host = percent_decode(&host).ok_or_else(invalid_url)?;
    let port: Option<u16> = match port {
        None | Some("") => None,
        Some(p) => Some(p.parse().map_err(|_| invalid_url())?),
    };
    let mut params: Vec<(String, String)> = Vec::new();
    if let Some(q) = query {
        for part in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(invalid_url)?;
            let k = percent_decode(k).ok_or_else(invalid_url)?;
            let v = percent_decode(v).ok_or_else(invalid_url)?;
            params.retain(|(pk, _)| *pk != k);
            params.push((k, v));
        }
        if params.len() > 1 || (is_unix && params.is_empty()) || (!is_unix && !params.is_empty()) {
            return Err(invalid_url());
        }
    }
    if is_unix {
        let socket = params
            .iter()
            .find(|(k, _)| k == "socket")
            .map(|(_, v)| v.clone());
        if query.is_none() {
            // QEMU looks the socket up in a table it never created, and GLib says so.
            crate::error::report(
                "GLib: g_hash_table_lookup: assertion 'hash_table != NULL' failed",
            );
        }
        match socket {
            Some(s) if host.is_empty() && port.is_none() => {
                kv.set("server.type", "unix");
                kv.set("server.path", &s);
            }
            _ => return Err(invalid_url()),
        }
    } else {
        if host.is_empty() {
            return Err(invalid_url());
        }
        kv.set("server.type", "inet");
        kv.set("server.host", &host);
        kv.set(
            "server.port",
            &port.filter(|&p| p > 0).unwrap_or(DEFAULT_PORT).to_string(),
        );
    }
    Ok(())
}

/// Parses an NBD filename into `kv`, as QEMU's `nbd_parse_filename` does.
fn parse_filename(filename: &str, kv: &mut KeyVal) -> Result<()> {
    if filename.contains("://") {
        return parse_uri(filename, kv);
    }
    const EN: &str = ":exportname=";
    let mut file = filename;
    if let Some(i) = filename.find(EN) {
        let e = &filename[i + EN.len()..];
        if e.is_empty() {
            return Ok(());
        }
        kv.set("export", e);
        file = &filename[..i];
    }
    let Some(spec) = file.strip_prefix("nbd:") else {
        return Err(Error::invalid(
            "File name string for NBD must start with 'nbd:'",
        ));
    };
    if spec.is_empty() {
        return Ok(());
    }
    if let Some(p) = spec.strip_prefix("unix:") {
        kv.set("server.type", "unix");
        kv.set("server.path", p);
        return Ok(());
    }
    let bad = || Error::invalid(format!("error parsing address '{spec}'"));
    let (host, port) = if let Some(r) = spec.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(bad)?;
        (h, after.strip_prefix(':').ok_or_else(bad)?)
    } else {
        spec.split_once(':').ok_or_else(bad)?
    };
    let port = port.split(',').next().unwrap_or(port);
    if port.is_empty() {
        return Err(bad());
    }
    kv.set("server.type", "inet");
    kv.set("server.host", host);
    kv.set("server.port", port);
    Ok(())
}

/// A connected socket.
pub enum Stream {
    /// Unix domain socket.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `addr`, with QEMU's messages on failure.
    pub fn connect(addr: &ServerAddr) -> Result<Stream> {
        let errno = |e: &std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        match addr {
            ServerAddr::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(|e| {
                Error::other(
                    format!(
                        "Failed to connect to '{p}': {}",
                        crate::error::strerror(errno(&e))
                    ),
                    errno(&e),
                )
            }),
            ServerAddr::Inet { host, port } => {
                let pn: u16 = port.parse().map_err(|_| {
                    Error::invalid(format!(
                        "address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
                    ))
                })?;
                let addrs: Vec<_> = (host.as_str(), pn)
                    .to_socket_addrs()
                    .map_err(|_| {
                        Error::other(
                            format!(
                                "address resolution failed for {host}:{port}: Name or service not known"
                            ),
                            libc::EINVAL,
                        )
                    })?
                    .collect();
                let mut last = libc::ECONNREFUSED;
                for a in addrs {
                    match TcpStream::connect(a) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = errno(&e),
                    }
                }
                Err(Error::other(
                    format!(
                        "Failed to connect to '{host}:{port}': {}",
                        crate::error::strerror(last)
                    ),
                    last,
                ))
            }
        }
    }

    /// Connects to `addr`, retrying failed attempts for `timeout` seconds.
    pub fn connect_retrying(addr: &ServerAddr, timeout: u64) -> Result<Stream> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
        loop {
            match Stream::connect(addr) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        return Err(e);
                    }
                    let step = std::time::Duration::from_millis(100);
                    std::thread::sleep(step.min(deadline - now));
                }
            }
        }
    }

    /// A second handle on the same socket (one for reading, one for writing).
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shuts both directions down (wakes a blocked reader).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: &str) -> Result<NbdOptions> {
        NbdOptions::take_from(f, &mut KeyVal::new())
    }

    #[test]
    fn filenames() {
        let o = opts("nbd+unix:///exp?socket=/tmp/s").unwrap();
        assert_eq!(o.server, ServerAddr::Unix("/tmp/s".into()));
        assert_eq!(o.export.as_deref(), Some("exp"));
        assert_eq!(o.display_name(), "nbd+unix:///exp?socket=/tmp/s");
        let o = opts("nbd://localhost/x").unwrap();
        assert_eq!(o.display_name(), "nbd://localhost:10809/x");
        let o = opts("nbd:unix:/tmp/s:exportname=e").unwrap();
        assert_eq!(o.display_name(), "nbd+unix:///e?socket=/tmp/s");
        let o = opts("nbd:h:1234").unwrap();
        assert_eq!(o.display_name(), "nbd://h:1234");
        assert_eq!(
            opts("nbd://").unwrap_err().to_string(),
            "No valid URL specified"
        );
        assert_eq!(
            opts("nbd:localhost").unwrap_err().to_string(),
            "error parsing address 'localhost'"
        );
        assert_eq!(
            opts("nbd:").unwrap_err().to_string(),
            "NBD server address missing"
        );
    }

    #[test]
    fn legacy_keys() {
        let mut kv = KeyVal::parse("host=127.0.0.1,path=/x", None).unwrap();
        assert_eq!(
            NbdOptions::take_from("", &mut kv).unwrap_err().to_string(),
            "path and host may not be used at the same time"
        );
        let mut kv = KeyVal::parse("path=/x,export=e", None).unwrap();
        let o = NbdOptions::take_from("", &mut kv).unwrap();
        assert_eq!(o.display_name(), "nbd+unix:///e?socket=/x");
    }
}

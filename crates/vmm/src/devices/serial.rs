//! 16550A UARTs (vm-superio's `Serial`) on the ISA ports of COM1..COM4, with their
//! interrupts injected through irqfds, and their host back ends: standard I/O (with
//! QEMU's Ctrl-a x to quit when `-nographic`), a file, or nothing.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use std::sync::atomic::{AtomicBool, Ordering};

use super::bus::{lock, PioDevice};
use crate::config::SerialBackend;
use crate::error::{Error, Result};

/// Base port and ISA interrupt of COM1..COM4.
pub const COM_PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];

/// An interrupt line raised by writing an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A UART on the port bus.
pub struct SerialPort(pub Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>);

impl PioDevice for SerialPort {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let Some(&v) = data.first() {
            // An output error (closed stdout) must not stop the guest.
            let _ = self.0.write(offset as u8, v);
        }
    }
}

/// Unbuffered standard output: each byte the guest sends appears at once.
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The host side of a serial port.
pub fn writer(backend: &SerialBackend) -> Result<Box<dyn Write + Send>> {
    Ok(match backend {
        SerialBackend::Stdio => Box::new(Stdout),
        SerialBackend::Null => Box::new(io::sink()),
        SerialBackend::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(p)
                .map_err(Error::io(format!(
                    "-serial file:{}: Could not open '{}'",
                    p.display(),
                    p.display()
                )))?,
        ),
    })
}

static TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts a terminal on standard input into raw mode (restored by [`restore_terminal`]).
pub fn raw_terminal() {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return;
    }
    // SAFETY: termios is a plain C struct; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return;
    }
    *lock(&TERMIOS) = Some(t);
    let mut raw = t;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    raw.c_oflag |= libc::OPOST | libc::ONLCR;
    // SAFETY: `raw` is a valid termios.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
}

/// Restores standard input's terminal mode.
pub fn restore_terminal() {
    if let Some(t) = lock(&TERMIOS).take() {
        // SAFETY: `t` was read by tcgetattr.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
}

/// Feeds standard input to `port` for the life of the process; Ctrl-a x sets `quit` when
/// `escape` is set, Ctrl-a Ctrl-a sends one Ctrl-a.
pub fn spawn_stdin_reader(port: Arc<Mutex<SerialPort>>, quit: Arc<AtomicBool>, escape: bool) {
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            let mut saw_ctrl_a = false;
            let mut stdin = io::stdin();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape && saw_ctrl_a {
                        saw_ctrl_a = false;
                        match b {
                            b'x' => {
                                quit.store(true, Ordering::SeqCst);
                                return;
                            }
                            0x01 => out.push(0x01),
                            _ => {}
                        }
                    } else if escape && b == 0x01 {
                        saw_ctrl_a = true;
                    } else {
                        out.push(b);
                    }
                }
                let mut rest = &out[..];
                while !rest.is_empty() {
                    let taken = lock(&port).0.enqueue_raw_bytes(rest).unwrap_or(0);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("warning: no serial input: {e}");
    }
}

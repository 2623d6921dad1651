//! qemu-io's commands: the table (names, argument counts, one-line descriptions) and
//! dispatch. Reading and writing live in [`rw`], the rest in [`misc`].

pub mod debug;
pub mod misc;
pub mod reopen;
pub mod rw;

use rqemu_cli::getopt;
use rqemu_cli::{outln, outp};

use crate::args::split_words;
use crate::state::State;

/// The result of one command.
pub enum Outcome {
    /// Finished with a status (negative errno on failure).
    Done(i32),
    /// `quit`.
    Quit,
}

/// A command's description.
pub struct CmdInfo {
    /// Name.
    pub name: &'static str,
    /// Alternative name.
    pub altname: Option<&'static str>,
    /// Fewest arguments.
    pub argmin: i32,
    /// Most arguments (-1: unlimited).
    pub argmax: i32,
    /// Argument synopsis.
    pub args: &'static str,
    /// One-line description.
    pub oneline: &'static str,
    /// Longer help.
    pub help: &'static str,
    /// Works without an open image.
    pub nofile_ok: bool,
    /// Modifies the image.
    pub writes: bool,
}

const fn cmd(
    name: &'static str,
    argmin: i32,
    argmax: i32,
    args: &'static str,
    oneline: &'static str,
    help: &'static str,
) -> CmdInfo {
    CmdInfo {
        name,
        altname: None,
        argmin,
        argmax,
        args,
        oneline,
        help,
        nofile_ok: false,
        writes: false,
    }
}

/// Every command, in the order `help` lists them.
pub static COMMANDS: &[CmdInfo] = &[
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "abort",
            0,
            0,
            "",
            "simulate a program crash using abort(3)",
            "",
        )
    },
    cmd(
        "aio_flush",
        0,
        0,
        "",
        "completes all outstanding aio requests",
        "",
    ),
    cmd(
        "aio_read",
        2,
        -1,
        "[-Ciqrv] [-P pattern] off len [len..]",
        "asynchronously reads a number of bytes",
        rw::AIO_READ_HELP,
    ),
    CmdInfo {
        writes: true,
        ..cmd(
            "aio_write",
            2,
            -1,
            "[-Cfiqruz] [-P pattern] off len [len..]",
            "asynchronously writes a number of bytes",
            rw::AIO_WRITE_HELP,
        )
    },
    cmd(
        "alloc",
        1,
        2,
        "offset [count]",
        "checks if offset is allocated in the file",
        "",
    ),
    cmd(
        "break",
        2,
        2,
        "event tag",
        "sets a breakpoint on event and tags the stopped request as tag",
        "",
    ),
    CmdInfo {
        nofile_ok: true,
        ..cmd("close", 0, 0, "", "close the current open file", "")
    },
    CmdInfo {
        writes: true,
        ..cmd(
            "discard",
            2,
            -1,
            "[-Cq] off len",
            "discards a number of bytes at a specified offset",
            misc::DISCARD_HELP,
        )
    },
    cmd(
        "flush",
        0,
        0,
        "",
        "flush all in-core file state to disk",
        "",
    ),
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "help",
            0,
            1,
            "[command]",
            "help for one or all commands",
            "",
        )
    },
    cmd(
        "info",
        0,
        0,
        "",
        "prints information about the current file",
        "",
    ),
    cmd(
        "length",
        0,
        0,
        "",
        "gets the length of the current file",
        "",
    ),
    cmd("map", 0, 0, "", "prints the allocated areas of a file", ""),
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "open",
            1,
            -1,
            "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
            "open the file specified by path",
            misc::OPEN_HELP,
        )
    },
    CmdInfo {
        nofile_ok: true,
        altname: Some("q"),
        ..cmd("quit", 0, 0, "", "exit the program", "")
    },
    cmd(
        "read",
        2,
        -1,
        "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
        "reads a number of bytes at a specified offset",
        rw::READ_HELP,
    ),
    cmd(
        "readv",
        2,
        -1,
        "[-Cqrv] [-P pattern] off len [len..]",
        "reads a number of bytes at a specified offset",
        rw::READV_HELP,
    ),
    cmd(
        "remove_break",
        1,
        1,
        "tag",
        "remove a breakpoint by tag",
        "",
    ),
    cmd(
        "reopen",
        0,
        -1,
        "[(-r|-w)] [-c cache] [-o options]",
        "reopens an image with new options",
        "",
    ),
    cmd(
        "resume",
        1,
        1,
        "tag",
        "resumes the request tagged as tag",
        "",
    ),
    CmdInfo {
        nofile_ok: true,
        ..cmd("sigraise", 1, 1, "signal", "raises a signal", "")
    },
    CmdInfo {
        nofile_ok: true,
        ..cmd(
            "sleep",
            1,
            1,
            "",
            "waits for the given value in milliseconds",
            "",
        )
    },
    CmdInfo {
        writes: true,
        ..cmd(
            "truncate",
            1,
            3,
            "[-m prealloc_mode] off",
            "truncates the current file at the given offset",
            "",
        )
    },
    cmd(
        "wait_break",
        1,
        1,
        "tag",
        "waits for the suspension of a request",
        "",
    ),
    CmdInfo {
        writes: true,
        ..cmd(
            "write",
            2,
            -1,
            "[-bcCfnqruz] [-P pattern | -s source_file] off len",
            "writes a number of bytes at a specified offset",
            rw::WRITE_HELP,
        )
    },
    CmdInfo {
        writes: true,
        ..cmd(
            "writev",
            2,
            -1,
            "[-Cfqr] [-P pattern] off len [len..]",
            "writes a number of bytes at a specified offset",
            rw::WRITEV_HELP,
        )
    },
];

/// Short names qemu-io also accepts.
const ALIASES: &[(&str, &str)] = &[
    ("r", "read"),
    ("w", "write"),
    ("f", "flush"),
    ("t", "truncate"),
    ("i", "info"),
    ("d", "discard"),
    ("a", "alloc"),
    ("o", "open"),
    ("c", "close"),
    ("?", "help"),
];

fn find(name: &str) -> Option<&'static CmdInfo> {
    let name = ALIASES
        .iter()
        .find(|(a, _)| *a == name)
        .map_or(name, |(_, full)| full);
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.altname == Some(name))
}

/// Prints a command's usage line.
pub fn usage(c: &CmdInfo) {
    if c.args.is_empty() && c.name != "map" {
        outln!("{} -- {}", c.name, c.oneline);
    } else {
        outln!("{} {} -- {}", c.name, c.args, c.oneline);
    }
}

/// Parses a command's options like glibc `getopt`; prints the error and the usage line.
pub fn parse_opts(c: &CmdInfo, argv: &[String], optstring: &str) -> Result<getopt::Parsed, i32> {
    getopt::parse(c.name, &argv[1..], optstring, &[]).map_err(|e| {
        eprintln!("{}", e.0);
        usage(c);
        -libc::EINVAL
    })
}

/// Runs one command line.
pub async fn execute(st: &mut State, line: &str) -> Outcome {
    let argv = split_words(line);
    let Some(name) = argv.first() else {
        return Outcome::Done(0);
    };
    let Some(c) = find(name) else {
        eprintln!("command \"{name}\" not found");
        return Outcome::Done(-libc::EINVAL);
    };
    if !c.nofile_ok && st.blk.is_none() {
        eprintln!("no file open, try 'help open'");
        return Outcome::Done(-libc::EINVAL);
    }
    let n = argv.len() as i32 - 1;
    if n < c.argmin || (c.argmax != -1 && n > c.argmax) {
        if c.argmax == -1 {
            eprintln!(
                "bad argument count {n} to {name}, expected at least {} arguments",
                c.argmin
            );
        } else if c.argmin == c.argmax {
            eprintln!(
                "bad argument count {n} to {name}, expected {} arguments",
                c.argmin
            );
        } else {
            eprintln!(
                "bad argument count {n} to {name}, expected between {} and {} arguments",
                c.argmin, c.argmax
            );
        }
        return Outcome::Done(-libc::EINVAL);
    }
    if c.writes {
        if let Some(b) = &st.blk {
            if b.is_read_only() {
                st.error("Block node is read-only");
                return Outcome::Done(-libc::EPERM);
            }
        }
    }
    let rc = match c.name {
        "quit" => return Outcome::Quit,
        "read" => rw::read(st, c, &argv).await,
        "write" => rw::write(st, c, &argv).await,
        "readv" => rw::readv(st, c, &argv).await,
        "writev" => rw::writev(st, c, &argv).await,
        "aio_read" => rw::aio_read(st, c, &argv).await,
        "aio_write" => rw::aio_write(st, c, &argv).await,
        "aio_flush" => {
            st.drain().await;
            0
        }
        "help" => help(&argv),
        "break" | "remove_break" | "resume" | "wait_break" => debug::run(st, c.name, &argv).await,
        other => misc::run(st, other, c, &argv).await,
    };
    Outcome::Done(rc)
}

fn help(argv: &[String]) -> i32 {
    if let Some(name) = argv.get(1) {
        let Some(c) = find(name) else {
            outln!("command {name} not found");
            return -libc::EINVAL;
        };
        usage(c);
        if !c.help.is_empty() {
            outp!("\n{}", c.help);
        }
        return 0;
    }
    for c in COMMANDS {
        usage(c);
    }
    outp!("\nUse 'help commandname' for extended help.\n");
    0
}

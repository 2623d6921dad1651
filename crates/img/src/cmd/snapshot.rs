//! `rqemu-img snapshot`: list, create, apply and delete internal snapshots.

use rqemu_block::format::qcow2::snapshot_ops::NewSnapshot;
use rqemu_block::format::qcow2::Qcow2;
use rqemu_block::BlockBackend;
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use super::info::{snapshot_header, snapshot_line};
use crate::common::{block_on, open_image, Ctx, ImageArgs};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("list", HasArg::No, 'l' as i32),
    LongOpt::new("apply", HasArg::Required, 'a' as i32),
    LongOpt::new("create", HasArg::Required, 'c' as i32),
    LongOpt::new("delete", HasArg::Required, 'd' as i32),
];

const HELP: &str = "\
Lists the internal snapshots of FILENAME (the default), or creates, applies or
deletes one.

  -l, --list              list the snapshots
  -c, --create NAME       create a snapshot of the current state named NAME
  -a, --apply NAME        make snapshot NAME (ID or name) the current state
  -d, --delete NAME       delete snapshot NAME
  -f, --format FMT        the image's format (probed when not given)
  --image-opts            FILENAME is a full option string
  -U, --force-share       open without locks (only with -l)
  -q, --quiet             print nothing on success
  --object OBJDEF         define an object (such as a secret)
  -h, --help              show this help
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    List,
    Create,
    Apply,
    Delete,
}

fn qcow2(blk: &BlockBackend) -> Option<&Qcow2> {
    blk.root().as_any().downcast_ref::<Qcow2>()
}

/// Runs `snapshot`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("snapshot", args, "la:c:d:f:hqU", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        writable: true,
        ..Default::default()
    };
    let mut action: Option<(Action, String)> = None;
    let mut quiet = false;
    let mut objects = crate::common::Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        let set =
            |act: Action, name: String, action: &mut Option<(Action, String)>| -> Result<(), i32> {
                if action.is_some() {
                    return Err(ctx.usage_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'"));
                }
                *action = Some((act, name));
                Ok(())
            };
        let r = match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(
                    &ctx.prog,
                    "snapshot",
                    "[-f FMT | --image-opts] [-l | -a NAME | -c NAME | -d NAME] [-U] [-q] FILENAME",
                    HELP,
                );
                return 0;
            }
            k if k == 'l' as i32 => {
                a.writable = false;
                set(Action::List, String::new(), &mut action)
            }
            k if k == 'a' as i32 => set(Action::Apply, v, &mut action),
            k if k == 'c' as i32 => set(Action::Create, v, &mut action),
            k if k == 'd' as i32 => set(Action::Delete, v, &mut action),
            k if k == 'f' as i32 => {
                a.format = Some(v);
                Ok(())
            }
            k if k == 'q' as i32 => {
                quiet = true;
                Ok(())
            }
            k if k == 'U' as i32 => {
                a.force_share = true;
                Ok(())
            }
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
                Ok(())
            }
            IMAGE_OPTS => {
                a.image_opts = true;
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(c) = r {
            return c;
        }
    }
    let (action, name) = action.unwrap_or((Action::List, String::new()));
    if action == Action::List {
        a.writable = false;
    }
    let Some(filename) = p.operands.first() else {
        return ctx.usage_error("snapshot", "Expecting one image file name");
    };
    if let Some(extra) = p.operands.get(1) {
        return ctx.usage_error("snapshot", &format!("Unexpected argument: {extra}"));
    }
    a.filename = filename.clone();
    block_on(async {
        let Some(blk) = open_image(ctx, &a).await else {
            return 1;
        };
        let code = match action {
            Action::List => {
                let snaps = blk.root().snapshots().await.unwrap_or_default();
                if !snaps.is_empty() && !quiet {
                    let mut s = format!("Snapshot list:\n{}\n", snapshot_header());
                    for sn in &snaps {
                        s.push_str(&snapshot_line(sn));
                        s.push('\n');
                    }
                    outp!("{s}");
                }
                0
            }
            Action::Create => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let r = match qcow2(&blk) {
                    Some(q) => {
                        q.snapshot_create(NewSnapshot {
                            name: name.clone(),
                            date_sec: now.as_secs() as u32,
                            date_nsec: now.subsec_micros() * 1000,
                            vm_clock_nsec: 0,
                            vm_state_size: 0,
                            icount: Some(0),
                        })
                        .await
                    }
                    None => Err(rqemu_block::Error::errno(libc::ENOTSUP)),
                };
                match r {
                    Ok(()) => 0,
                    Err(e) => {
                        ctx.error(&format!(
                            "Could not create snapshot '{name}': {}",
                            rqemu_block::error::strerror(e.errno_value())
                        ));
                        1
                    }
                }
            }
            Action::Apply => {
                let r = match qcow2(&blk) {
                    Some(q) => q.snapshot_goto(&name).await,
                    None => Err(rqemu_block::Error::errno(libc::ENOTSUP)),
                };
                match r {
                    Ok(()) => 0,
                    Err(e) => {
                        let msg = match &e {
                            rqemu_block::Error::Os {
                                context: None,
                                errno,
                            } => format!(
                                "Failed to load snapshot: {}",
                                rqemu_block::error::strerror(*errno)
                            ),
                            other => other.to_string(),
                        };
                        ctx.error(&format!("Could not apply snapshot '{name}': {msg}"));
                        1
                    }
                }
            }
            Action::Delete => {
                let snaps = blk.root().snapshots().await.unwrap_or_default();
                match snaps.iter().find(|s| s.name == name) {
                    None => {
                        ctx.error(&format!(
                            "Could not delete snapshot '{name}': snapshot not found"
                        ));
                        1
                    }
                    Some(sn) => {
                        let r = match qcow2(&blk) {
                            Some(q) => q.snapshot_delete(Some(&sn.id), Some(&sn.name)).await,
                            None => Err(rqemu_block::Error::errno(libc::ENOTSUP)),
                        };
                        match r {
                            Ok(()) => 0,
                            Err(e) => {
                                ctx.error(&format!("Could not delete snapshot '{name}': {e}"));
                                1
                            }
                        }
                    }
                }
            }
        };
        if let Err(e) = blk.close().await {
            if code == 0 {
                ctx.error(&e.to_string());
                return 1;
            }
        }
        code
    })
}

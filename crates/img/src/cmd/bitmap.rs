//! `rqemu-img bitmap`: add, remove, clear, enable, disable and merge the persistent
//! dirty bitmaps of an image, several operations in one command, applied in order.

use rqemu_block::format::qcow2::bitmaps_store::anonymous_node_name;
use rqemu_block::format::qcow2::Qcow2;
use rqemu_block::{BlockBackend, Error};
use rqemu_cli::getopt::{HasArg, LongOpt};

use crate::common::{block_on, check_image_opts, cvtnum_full, open_image, Ctx, ImageArgs, Objects};

const ADD: i32 = 256;
const REMOVE: i32 = 257;
const CLEAR: i32 = 258;
const ENABLE: i32 = 259;
const DISABLE: i32 = 260;
const MERGE: i32 = 261;
const OBJECT: i32 = 262;
const IMAGE_OPTS: i32 = 263;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("add", HasArg::No, ADD),
    LongOpt::new("remove", HasArg::No, REMOVE),
    LongOpt::new("clear", HasArg::No, CLEAR),
    LongOpt::new("enable", HasArg::No, ENABLE),
    LongOpt::new("disable", HasArg::No, DISABLE),
    LongOpt::new("merge", HasArg::Required, MERGE),
    LongOpt::new("granularity", HasArg::Required, 'g' as i32),
    LongOpt::new("source-file", HasArg::Required, 'b' as i32),
    LongOpt::new("source-format", HasArg::Required, 'F' as i32),
];

const SYNOPSIS: &str = "(--merge SOURCE | --add | --remove | --clear | --enable | --disable)... \
[-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJDEF] [--image-opts | -f FMT] \
FILENAME BITMAP";

const HELP: &str = "\
Changes the persistent dirty bitmap BITMAP of FILENAME; the operations are applied
in the order given.

  --add                     create BITMAP, recording writes from now on
  -g, --granularity SIZE    bytes per bit of a bitmap --add creates
  --remove                  delete BITMAP
  --clear                   reset every bit of BITMAP
  --enable                  make BITMAP record writes
  --disable                 make BITMAP stop recording writes
  --merge SOURCE            set in BITMAP every bit set in bitmap SOURCE
  -b, --source-file FILE    take --merge's SOURCE bitmaps from FILE
  -F, --source-format FMT   the format of FILE
  -f FMT                    the format of FILENAME (probed when not given)
  --image-opts              FILENAME is a full option string
  --object OBJDEF           define an object (such as a secret)
  -h, --help                show this help
";

/// One operation of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

fn qcow2(blk: &BlockBackend) -> Option<&Qcow2> {
    blk.root().as_any().downcast_ref::<Qcow2>()
}

fn not_found(name: &str) -> Error {
    Error::other(format!("Dirty bitmap '{name}' not found"), libc::ENOENT)
}

/// Runs `bitmap`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("bitmap", args, "b:f:F:g:h", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        writable: true,
        ..Default::default()
    };
    let mut actions = Vec::new();
    let mut granularity: u64 = 0;
    let (mut source_file, mut source_fmt) = (None::<String>, None::<String>);
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "bitmap", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'b' as i32 => source_file = Some(v),
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'F' as i32 => source_fmt = Some(v),
            k if k == 'g' as i32 => match cvtnum_full(ctx, "granularity", &v, true, 0, i64::MAX) {
                Some(g) => granularity = g as u64,
                None => return 1,
            },
            ADD => actions.push(Action::Add),
            REMOVE => actions.push(Action::Remove),
            CLEAR => actions.push(Action::Clear),
            ENABLE => actions.push(Action::Enable),
            DISABLE => actions.push(Action::Disable),
            MERGE => actions.push(Action::Merge(v)),
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            IMAGE_OPTS => a.image_opts = true,
            _ => {}
        }
    }
    if actions.is_empty() {
        ctx.error("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
        return 1;
    }
    if granularity != 0 && !actions.contains(&Action::Add) {
        ctx.error("granularity only supported with --add");
        return 1;
    }
    if source_fmt.is_some() && source_file.is_none() {
        ctx.error("-F only supported with -b");
        return 1;
    }
    let merging = actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if source_file.is_some() && !merging {
        ctx.error("Merge bitmap source file only supported with --merge");
        return 1;
    }
    let [filename, bitmap] = p.operands.as_slice() else {
        ctx.error("Expecting filename and bitmap name");
        return 1;
    };
    a.filename = filename.clone();
    if !check_image_opts(ctx, &a) {
        return 1;
    }
    // QEMU's granularity is 32 bits wide: larger values wrap.
    let granularity = (granularity != 0).then_some(granularity as u32 as u64);
    block_on(async {
        let Some(blk) = open_image(ctx, &a).await else {
            return 1;
        };
        let src = match &source_file {
            Some(f) => {
                let sa = ImageArgs {
                    filename: f.clone(),
                    format: source_fmt.clone(),
                    no_backing: true,
                    ..Default::default()
                };
                match open_image(ctx, &sa).await {
                    Some(s) => Some(s),
                    None => {
                        let _ = blk.close().await;
                        return 1;
                    }
                }
            }
            None => None,
        };
        let mut code = 0;
        for act in &actions {
            let src_blk = src.as_ref().unwrap_or(&blk);
            if let Err(e) = apply(act, &blk, src_blk, bitmap, granularity).await {
                ctx.error(&format!(
                    "Operation {} on bitmap {bitmap} failed: {e}",
                    act.name()
                ));
                code = 1;
                break;
            }
        }
        if let Some(s) = &src {
            let _ = s.close().await;
        }
        if let Err(e) = blk.close().await {
            if code == 0 {
                ctx.error(&e.to_string());
                code = 1;
            }
            // QEMU's final close tries (and reports) once more.
            let _ = blk.close().await;
        }
        code
    })
}

/// Applies one operation to bitmap `name` of `blk` (merge sources come from `src`).
async fn apply(
    act: &Action,
    blk: &BlockBackend,
    src: &BlockBackend,
    name: &str,
    granularity: Option<u64>,
) -> rqemu_block::Result<()> {
    let q = qcow2(blk);
    match act {
        Action::Add => match q {
            Some(q) => q.bitmap_add(name, granularity, false).await,
            None => {
                if name.is_empty() {
                    return Err(Error::invalid("Bitmap name cannot be empty"));
                }
                if granularity.is_some_and(|g| g < 512 || !g.is_power_of_two()) {
                    return Err(Error::invalid(
                        "Granularity must be power of 2 and at least 512",
                    ));
                }
                Err(Error::other(
                    format!(
                        "Can't store persistent bitmaps to {}: Operation not supported",
                        anonymous_node_name()
                    ),
                    libc::ENOTSUP,
                ))
            }
        },
        Action::Remove => q.ok_or_else(|| not_found(name))?.bitmap_remove(name).await,
        Action::Clear => q.ok_or_else(|| not_found(name))?.bitmap_clear(name),
        Action::Enable => q
            .ok_or_else(|| not_found(name))?
            .bitmap_set_enabled(name, true),
        Action::Disable => q
            .ok_or_else(|| not_found(name))?
            .bitmap_set_enabled(name, false),
        Action::Merge(source) => {
            let q = q.ok_or_else(|| not_found(name))?;
            q.bitmap_check_target(name)?;
            let bits = qcow2(src)
                .ok_or_else(|| not_found(source))?
                .bitmap_contents(source)?;
            q.bitmap_merge(name, &bits)
        }
    }
}

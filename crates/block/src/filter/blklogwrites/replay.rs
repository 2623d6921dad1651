//! Power-cut states from a write log: what a device could hold if power failed after a
//! given number of logged entries.
//!
//! The model is a disk with a volatile write cache. A write completed before a flush
//! that completed is durable; so is a write issued with FUA once it completed. Any write
//! after the last completed flush may or may not have reached the medium, in any order
//! with the others, and a write that spans several 4 KiB sectors may have reached it
//! only in part (each sector whole or not at all). A state is therefore: the base image,
//! every durable write applied in log order, then a chosen subset of the other writes in
//! a chosen order, each whole or torn. Discards and written zeroes count as writes of
//! zeroes (a discarded range of a file reads as zeroes once the hole is punched).

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::log::{Log, Op};

/// Sectors of this size reach the medium whole or not at all.
pub const ATOMIC: u64 = 4096;
/// Most pieces one torn write is cut into: longer writes (a discard of a whole device)
/// tear at a coarser multiple of [`ATOMIC`], so a state stays small whatever a log says.
const MAX_TORN_PIECES: u64 = 1024;

/// One range to write when building a state: bytes from the log, or zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the bytes in the log; `None` for zeroes.
    pub data: Option<u64>,
}

/// A device state after a power cut: the pieces to write over the base image, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashState {
    /// Entries of the log that had been issued (the cut lies after entry `cut - 1`).
    pub cut: usize,
    /// What to write over the base, in order.
    pub pieces: Vec<Piece>,
    /// Pieces that are durable (the first `durable` of `pieces`).
    pub durable: usize,
}

/// A small deterministic generator (splitmix64), so a failing state can be rebuilt from
/// its seed; sampling needs nothing stronger.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn piece(op: &Op) -> Option<Piece> {
    match *op {
        Op::Write {
            offset, len, data, ..
        } => Some(Piece {
            offset,
            len,
            data: Some(data),
        }),
        Op::Discard { offset, len } => Some(Piece {
            offset,
            len,
            data: None,
        }),
        Op::Flush | Op::Mark(_) => None,
    }
}

/// The pieces durable at a cut after `cut` entries, and the indices of the entries that
/// may or may not have reached the medium.
fn split(log: &Log, cut: usize) -> (Vec<Piece>, Vec<usize>) {
    let ops = &log.ops[..cut.min(log.ops.len())];
    let last_flush = ops.iter().rposition(|o| matches!(o, Op::Flush));
    let mut durable = Vec::new();
    let mut volatile = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Some(p) = piece(op) else { continue };
        let fua = matches!(op, Op::Write { fua: true, .. });
        if last_flush.is_some_and(|f| i < f) || fua {
            durable.push(p);
        } else {
            volatile.push(i);
        }
    }
    (durable, volatile)
}

/// Entries after the last flush before a cut after `cut` entries: the writes a power
/// cut there may lose.
pub fn volatile_count(log: &Log, cut: usize) -> usize {
    split(log, cut).1.len()
}

/// Every state of a cut after `cut` entries in which each write after the last flush
/// reached the medium whole or not at all, applied in log order: `2^n` states for `n`
/// such writes. `None` when there are more than `max` of them.
pub fn every_subset(log: &Log, cut: usize, max: usize) -> Option<Vec<CrashState>> {
    let (durable, volatile) = split(log, cut);
    if volatile.len() > max {
        return None;
    }
    let mut states = Vec::new();
    for mask in 0u64..1 << volatile.len() {
        let mut pieces = durable.clone();
        for (bit, &i) in volatile.iter().enumerate() {
            if mask & (1 << bit) != 0 {
                pieces.extend(piece(&log.ops[i]));
            }
        }
        states.push(CrashState {
            cut,
            pieces,
            durable: durable.len(),
        });
    }
    Some(states)
}

/// One randomly chosen state of a cut after `cut` entries: each write after the last
/// flush is left out, applied whole or torn (a random subset of its 4 KiB sectors), and
/// those applied go in a random order.
pub fn sample(log: &Log, cut: usize, rng: &mut Rng) -> CrashState {
    let (durable, mut volatile) = split(log, cut);
    // Fisher-Yates: a random order of the candidates.
    for i in (1..volatile.len()).rev() {
        volatile.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut pieces = durable.clone();
    for i in volatile {
        let Some(p) = piece(&log.ops[i]) else {
            continue;
        };
        match rng.below(3) {
            0 => {}
            1 => pieces.push(p),
            _ => pieces.extend(torn(p, rng)),
        }
    }
    CrashState {
        cut,
        pieces,
        durable: durable.len(),
    }
}

/// A random subset of `p`'s atomic sectors (or of runs of them, for long writes).
fn torn(p: Piece, rng: &mut Rng) -> Vec<Piece> {
    let mut out = Vec::new();
    let unit = p.len.div_ceil(MAX_TORN_PIECES).next_multiple_of(ATOMIC);
    let end = p.offset + p.len;
    let mut at = p.offset;
    while at < end {
        let next = ((at / unit + 1) * unit).min(end);
        if rng.below(2) == 0 {
            out.push(Piece {
                offset: at,
                len: next - at,
                data: p.data.map(|d| d + (at - p.offset)),
            });
        }
        at = next;
    }
    out
}

/// The label of the last mark logged before a cut after `cut` entries.
pub fn last_mark(log: &Log, cut: usize) -> Option<&str> {
    log.ops[..cut.min(log.ops.len())]
        .iter()
        .rev()
        .find_map(|o| match o {
            Op::Mark(m) => Some(m.as_str()),
            _ => None,
        })
}

/// Builds `state` at `out`: a copy of `base` with the state's pieces written over it
/// (their bytes taken from `log`, the log's raw bytes).
pub fn materialize(base: &Path, out: &Path, log: &[u8], state: &CrashState) -> io::Result<()> {
    std::fs::copy(base, out)?;
    let f = std::fs::OpenOptions::new().write(true).open(out)?;
    let zeroes = vec![0u8; 1 << 20];
    for p in &state.pieces {
        let end = p
            .offset
            .checked_add(p.len)
            .ok_or_else(|| io::Error::other("a piece ends past 2^64"))?;
        match p.data {
            Some(d) => {
                let range = usize::try_from(d)
                    .ok()
                    .zip(d.checked_add(p.len).and_then(|e| usize::try_from(e).ok()))
                    .filter(|(_, e)| *e <= log.len())
                    .ok_or_else(|| io::Error::other("a piece lies outside the log"))?;
                f.write_all_at(&log[range.0..range.1], p.offset)?;
            }
            None => {
                // A discard: zeroes over what the file holds (a discard past its end
                // does not extend it).
                let held = f.metadata()?.len().min(end);
                let mut at = p.offset;
                while at < held {
                    let n = (held - at).min(zeroes.len() as u64) as usize;
                    f.write_all_at(&zeroes[..n], at)?;
                    at += n as u64;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, len: u64) -> Op {
        Op::Write {
            offset,
            len,
            data: 512 + offset,
            fua: false,
        }
    }

    fn log(ops: Vec<Op>) -> Log {
        Log {
            sector_size: 512,
            ops,
        }
    }

    #[test]
    fn a_flush_makes_what_came_before_durable() {
        let l = log(vec![w(0, 512), Op::Flush, w(4096, 512), w(8192, 8192)]);
        assert_eq!(volatile_count(&l, 1), 1);
        assert_eq!(volatile_count(&l, 2), 0);
        assert_eq!(volatile_count(&l, 4), 2);
        let all = every_subset(&l, 4, 4).unwrap();
        assert_eq!(all.len(), 4);
        assert!(all
            .iter()
            .all(|s| s.durable == 1 && s.pieces[0].offset == 0));
        assert_eq!(all[3].pieces.len(), 3);
        assert!(every_subset(&l, 4, 1).is_none());
    }

    #[test]
    fn fua_writes_are_durable_when_complete() {
        let l = log(vec![Op::Write {
            offset: 0,
            len: 512,
            data: 512,
            fua: true,
        }]);
        assert_eq!(volatile_count(&l, 1), 0);
        assert_eq!(every_subset(&l, 1, 0).unwrap()[0].durable, 1);
    }

    #[test]
    fn samples_tear_at_sector_boundaries() {
        let l = log(vec![w(1024, 5 * ATOMIC)]);
        let mut rng = Rng::new(7);
        let mut torn_seen = false;
        for _ in 0..200 {
            let s = sample(&l, 1, &mut rng);
            assert_eq!(s.durable, 0);
            for p in &s.pieces {
                assert!(p.offset >= 1024 && p.offset + p.len <= 1024 + 5 * ATOMIC);
                assert_eq!(p.data, Some(512 + p.offset));
                if p.len < 5 * ATOMIC {
                    torn_seen = true;
                    assert!(p.offset == 1024 || p.offset.is_multiple_of(ATOMIC));
                    assert!(p.len <= ATOMIC);
                }
            }
        }
        assert!(torn_seen);
    }

    #[test]
    fn a_huge_discard_tears_into_few_pieces() {
        let l = log(vec![Op::Discard {
            offset: 0,
            len: 1 << 60,
        }]);
        let mut rng = Rng::new(3);
        for _ in 0..20 {
            let s = sample(&l, 1, &mut rng);
            assert!(s.pieces.len() as u64 <= MAX_TORN_PIECES);
        }
    }

    #[test]
    fn marks_name_the_last_checkpoint() {
        let l = log(vec![w(0, 512), Op::Flush, Op::Mark("a".into()), w(0, 512)]);
        assert_eq!(last_mark(&l, 2), None);
        assert_eq!(last_mark(&l, 3), Some("a"));
        assert_eq!(last_mark(&l, 4), Some("a"));
    }

    #[test]
    fn materializes_pieces_over_the_base() {
        let dir = std::env::temp_dir().join(format!("rqemu-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base");
        std::fs::write(&base, vec![1u8; 8192]).unwrap();
        let mut logb = vec![0u8; 512];
        logb.extend(vec![9u8; 1024]);
        let state = CrashState {
            cut: 2,
            durable: 1,
            pieces: vec![
                Piece {
                    offset: 100,
                    len: 1024,
                    data: Some(512),
                },
                Piece {
                    offset: 8000,
                    len: 400,
                    data: None,
                },
            ],
        };
        let out = dir.join("out");
        materialize(&base, &out, &logb, &state).unwrap();
        let b = std::fs::read(&out).unwrap();
        assert_eq!(b.len(), 8192);
        assert!(b[100..1124].iter().all(|&x| x == 9));
        assert!(b[8000..].iter().all(|&x| x == 0));
        assert_eq!(b[7999], 1);
        assert_eq!(b[99], 1);
        let bad = CrashState {
            pieces: vec![Piece {
                offset: 0,
                len: 10,
                data: Some(10_000),
            }],
            ..state
        };
        assert!(materialize(&base, &out, &logb, &bad).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

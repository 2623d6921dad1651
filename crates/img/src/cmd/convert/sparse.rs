//! Sparse detection in data about to be written (`convert -S`): which sectors of a buffer
//! are worth allocating, with qemu-img's rules for short zero runs and target alignment.

use rqemu_block::backend::is_zero;

const SECTOR: usize = 512;

/// Splits off the leading run of `buf` (`n` sectors starting at `sector_num`) that is
/// all zero or all non-zero; returns (whether it is data, its length in sectors). Run
/// ends inside an `alignment`-sector block move: data runs end aligned up, zero runs
/// aligned down, and a zero run no longer than the misaligned tail counts as data.
pub fn allocated_run(buf: &[u8], n: usize, sector_num: u64, alignment: u64) -> (bool, usize) {
    if n == 0 {
        return (false, 0);
    }
    let zero = is_zero(&buf[..SECTOR]);
    let mut i = 1;
    while i < n && is_zero(&buf[i * SECTOR..(i + 1) * SECTOR]) == zero {
        i += 1;
    }
    if i == n {
        return (!zero, n);
    }
    let tail = ((sector_num + i as u64) & (alignment - 1)) as usize;
    let mut data = !zero;
    if tail != 0 {
        if !data && i <= tail {
            // A zero stretch that only makes up an unaligned tail is not worth a hole.
            data = true;
        }
        if data {
            i = (i + alignment as usize - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (data, i)
}

/// Like [`allocated_run`], but zero runs shorter than `min` sectors inside data count as
/// data (`-S`): returns (whether the leading part is data, its length in sectors).
pub fn allocated_run_min(
    buf: &[u8],
    n: usize,
    min: usize,
    sector_num: u64,
    alignment: u64,
) -> (bool, usize) {
    let min = min.min(n);
    let (data, first) = allocated_run(buf, n, sector_num, alignment);
    if !data {
        return (false, first);
    }
    let mut used = first;
    let mut checked = first;
    let mut rest = n - first;
    let mut sector = sector_num + first as u64;
    while rest > 0 {
        let (d, len) = allocated_run(&buf[checked * SECTOR..], rest, sector, alignment);
        rest -= len;
        sector += len as u64;
        checked += len;
        if d {
            used = checked;
        } else if len >= min {
            break;
        }
    }
    (true, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(pattern: &[bool]) -> Vec<u8> {
        pattern
            .iter()
            .flat_map(|&d| vec![if d { 1u8 } else { 0 }; SECTOR])
            .collect()
    }

    #[test]
    fn whole_runs() {
        assert_eq!(allocated_run(&buf(&[false; 4]), 4, 0, 8), (false, 4));
        assert_eq!(allocated_run(&buf(&[true; 4]), 4, 0, 8), (true, 4));
    }

    #[test]
    fn data_ends_aligned_up_and_zero_aligned_down() {
        let mut p = vec![true; 3];
        p.extend([false; 13]);
        assert_eq!(allocated_run(&buf(&p), 16, 0, 8), (true, 8));
        let mut p = vec![false; 10];
        p.extend([true; 6]);
        assert_eq!(allocated_run(&buf(&p), 16, 0, 8), (false, 8));
        // A zero run within the misaligned head of a block counts as data.
        let mut p = vec![false; 2];
        p.extend([true; 6]);
        assert_eq!(allocated_run(&buf(&p), 8, 4, 8), (true, 4));
    }

    #[test]
    fn short_zero_gaps_stay_data() {
        let mut p = vec![true; 8];
        p.extend([false; 8]);
        p.extend([true; 8]);
        p.extend([false; 16]);
        assert_eq!(allocated_run_min(&buf(&p), 40, 16, 0, 8), (true, 24));
        assert_eq!(allocated_run_min(&buf(&p), 40, 8, 0, 8), (true, 8));
    }
}

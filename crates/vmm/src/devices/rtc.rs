//! The MC146818 CMOS real-time clock on ports 0x70/0x71.
//!
//! The time is the host's clock plus an offset: the `-rtc base=` start (UTC, local time or
//! a fixed date) and whatever the guest sets later. Registers follow status register B's
//! BCD and 24-hour bits. NVRAM bytes are plain storage, with the memory size filled in.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::PioDevice;
use crate::config::{RtcBase, RtcConfig};

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;

/// The CMOS device.
pub struct Rtc {
    index: usize,
    nvram: [u8; 128],
    /// Seconds added to the host's UTC time.
    offset: i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn local_offset(now: i64) -> i64 {
    let t = now as libc::time_t;
    // SAFETY: `tm` is a plain C struct for which all-zero bytes are valid, and
    // localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        0
    } else {
        tm.tm_gmtoff
    }
}

/// (year, month, day, hour, minute, second, weekday 1=Sunday) of `secs` since the epoch.
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wday = ((days + 4).rem_euclid(7) + 1) as u32;
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
        wday,
    )
}

impl Rtc {
    /// A clock started as `cfg` says, with `mem_size` recorded in NVRAM.
    pub fn new(cfg: &RtcConfig, mem_size: u64) -> Self {
        let now = host_now();
        let offset = match cfg.base {
            RtcBase::Utc => 0,
            RtcBase::LocalTime => local_offset(now),
            RtcBase::Fixed(t) => t - now,
        };
        let mut nvram = [0u8; 128];
        nvram[REG_A] = 0x26;
        nvram[REG_B] = B_24H;
        nvram[REG_D] = 0x80;
        let kb = 640u16.to_le_bytes();
        nvram[0x15] = kb[0];
        nvram[0x16] = kb[1];
        let ext_kb = ((mem_size.saturating_sub(1 << 20)) >> 10).min(0xfc00) as u16;
        nvram[0x17..0x19].copy_from_slice(&ext_kb.to_le_bytes());
        nvram[0x30..0x32].copy_from_slice(&ext_kb.to_le_bytes());
        let above16 =
            ((mem_size.min(0xc000_0000).saturating_sub(16 << 20)) >> 16).min(0xffff) as u16;
        nvram[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        Rtc {
            index: 0,
            nvram,
            offset,
        }
    }

    fn encode(&self, v: u32) -> u8 {
        if self.nvram[REG_B] & B_BINARY != 0 {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.nvram[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            u32::from(v >> 4) * 10 + u32::from(v & 0xf)
        }
    }

    fn now(&self) -> i64 {
        host_now() + self.offset
    }

    fn read_reg(&mut self, reg: usize) -> u8 {
        let (y, mo, d, h, mi, s, wd) = civil(self.now());
        match reg {
            0x00 => self.encode(s),
            0x02 => self.encode(mi),
            0x04 => {
                if self.nvram[REG_B] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
                    self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            0x06 => self.encode(wd),
            0x07 => self.encode(d),
            0x08 => self.encode(mo),
            0x09 => self.encode((y.rem_euclid(100)) as u32),
            0x32 => self.encode((y / 100) as u32),
            REG_A => self.nvram[REG_A] & 0x7f, // never in an update cycle
            REG_C => {
                let v = self.nvram[REG_C];
                self.nvram[REG_C] = 0;
                v
            }
            r => self.nvram[r],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8) {
        let time_field = matches!(reg, 0x00 | 0x02 | 0x04 | 0x07 | 0x08 | 0x09 | 0x32);
        if !time_field {
            match reg {
                REG_C | REG_D => {}
                _ => self.nvram[reg] = v,
            }
            return;
        }
        let (mut y, mut mo, mut d, mut h, mut mi, mut s, _) = civil(self.now());
        let val = self.decode(v & if reg == 0x04 { 0x7f } else { 0xff });
        match reg {
            0x00 => s = val.min(59),
            0x02 => mi = val.min(59),
            0x04 => {
                h = if self.nvram[REG_B] & B_24H != 0 {
                    val
                } else {
                    (val % 12) + if v & 0x80 != 0 { 12 } else { 0 }
                }
                .min(23)
            }
            0x07 => d = val.clamp(1, 31),
            0x08 => mo = val.clamp(1, 12),
            0x09 => y = y - y.rem_euclid(100) + i64::from(val % 100),
            _ => y = i64::from(val) * 100 + y.rem_euclid(100),
        }
        let t = crate::config::days_from_civil(y, mo, d) * 86400
            + i64::from(h) * 3600
            + i64::from(mi) * 60
            + i64::from(s);
        self.offset = t - host_now();
    }
}

impl PioDevice for Rtc {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = if offset == 1 {
            let reg = self.index;
            self.read_reg(reg)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 {
            self.index = usize::from(v & 0x7f);
        } else {
            let reg = self.index;
            self.write_reg(reg, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_base_reads_back_in_bcd() {
        let cfg = RtcConfig {
            base: RtcBase::Fixed(1150560081), // 2006-06-17T16:01:21
            clock_vm: false,
        };
        let mut rtc = Rtc::new(&cfg, 128 << 20);
        let mut read = |reg: u8| {
            rtc.write(0, &[reg]);
            let mut b = [0u8];
            rtc.read(1, &mut b);
            b[0]
        };
        assert_eq!(read(0x09), 0x06);
        assert_eq!(read(0x08), 0x06);
        assert_eq!(read(0x07), 0x17);
        assert_eq!(read(0x04), 0x16);
        assert_eq!(read(0x32), 0x20);
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0, 5));
    }

    #[test]
    fn guest_sets_the_year() {
        let cfg = RtcConfig {
            base: RtcBase::Utc,
            clock_vm: false,
        };
        let mut rtc = Rtc::new(&cfg, 128 << 20);
        rtc.write(0, &[0x09]);
        rtc.write(1, &[0x99]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0x99);
    }
}

//! The ACPI fixed hardware: PM1a event block (status, enable), PM1a control block (SLP_TYP
//! and SLP_EN: S5 powers off), the 3.579545 MHz PM timer, and the reset control register
//! at 0xcf9 (also the FADT's reset register).

use std::sync::Arc;
use std::time::Instant;

use super::bus::{Control, PioDevice, StopReason};
use crate::arch::acpi::SLP_TYP_S5;

const PM_TIMER_HZ: u128 = 3_579_545;
const SLP_EN: u16 = 1 << 13;
const SCI_EN: u16 = 1;

/// The PM block at [`crate::arch::layout::ACPI_PM_PORT`] (12 ports).
pub struct AcpiPm {
    control: Arc<Control>,
    status: u16,
    enable: u16,
    cnt: u16,
    start: Instant,
}

impl AcpiPm {
    /// A PM block in ACPI mode.
    pub fn new(control: Arc<Control>) -> Self {
        AcpiPm {
            control,
            status: 0,
            enable: 0,
            cnt: SCI_EN,
            start: Instant::now(),
        }
    }

    fn timer(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }

    fn reg_bytes(&self, offset: u16) -> [u8; 12] {
        let mut r = [0u8; 12];
        r[0..2].copy_from_slice(&self.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.enable.to_le_bytes());
        r[4..6].copy_from_slice(&self.cnt.to_le_bytes());
        if offset >= 8 {
            r[8..12].copy_from_slice(&self.timer().to_le_bytes());
        }
        r
    }
}

impl PioDevice for AcpiPm {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let regs = self.reg_bytes(offset);
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let mut v = [0u8; 2];
        for (i, b) in data.iter().take(2).enumerate() {
            v[i] = *b;
        }
        let v = u16::from_le_bytes(v);
        match offset {
            0 => self.status &= !v, // write 1 to clear
            2 => self.enable = v,
            4 => {
                self.cnt = (v & !SLP_EN) | SCI_EN;
                if v & SLP_EN != 0 && (v >> 10) & 7 == SLP_TYP_S5 {
                    self.control.request(StopReason::PowerOff);
                }
            }
            _ => {}
        }
    }
}

/// The reset control register (port 0xcf9): bit 2 set resets the machine.
pub struct ResetControl {
    control: Arc<Control>,
    value: u8,
}

impl ResetControl {
    /// A register that stops the machine with [`StopReason::Reset`].
    pub fn new(control: Arc<Control>) -> Self {
        ResetControl { control, value: 0 }
    }
}

impl PioDevice for ResetControl {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u16, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.value = v & 0x0a;
            if v & 0x04 != 0 {
                self.control.request(StopReason::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off() {
        let c = Control::new();
        let mut pm = AcpiPm::new(c.clone());
        pm.write(4, &(SLP_EN | (1 << 10)).to_le_bytes());
        assert!(!c.is_stopping());
        pm.write(4, &(SLP_EN | (SLP_TYP_S5 << 10)).to_le_bytes());
        assert_eq!(
            c.wait_timeout(std::time::Duration::ZERO),
            Some(StopReason::PowerOff)
        );
        let mut t1 = [0u8; 4];
        pm.read(8, &mut t1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut t2 = [0u8; 4];
        pm.read(8, &mut t2);
        assert!(u32::from_le_bytes(t2) > u32::from_le_bytes(t1));
    }
}

//! The i8042 keyboard controller, as much as a guest needs to reset the machine through
//! it: command 0xfe on port 0x64 pulses the reset line. No keyboard is attached.

use std::sync::Arc;

use super::bus::{Control, PioDevice, StopReason};

/// Ports 0x60 (data) and 0x64 (status/command), registered as one range of 5 ports.
pub struct I8042 {
    control: Arc<Control>,
    ctr: u8,
    expect_ctr: bool,
    out: Option<u8>,
}

impl I8042 {
    /// A controller whose reset command stops the machine with [`StopReason::Reset`].
    pub fn new(control: Arc<Control>) -> Self {
        I8042 {
            control,
            ctr: 0x45,
            expect_ctr: false,
            out: None,
        }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match offset {
            0 => self.out.take().unwrap_or(0),
            4 => 0x14 | u8::from(self.out.is_some()), // system flag, keyboard unlocked
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            4 => match v {
                0xfe => self.control.request(StopReason::Reset),
                0x20 => self.out = Some(self.ctr),
                0x60 => self.expect_ctr = true,
                0xaa => self.out = Some(0x55), // self-test passed
                _ => {}
            },
            0 if self.expect_ctr => {
                self.ctr = v;
                self.expect_ctr = false;
            }
            _ => {}
        }
    }
}

//! qemu-img's progress meter (`-p`): `    (NN.NN/100%)` rewritten in place.

use rqemu_cli::outp;

/// qemu-img's progress meter: `    (P/100%)` rewritten in place, in single precision.
pub struct Progress {
    enabled: bool,
    current: f32,
    last_print: f32,
    min_skip: f32,
}

impl Progress {
    /// A meter printing only when `enabled`, at least `min_skip` percent apart.
    pub fn new(enabled: bool, min_skip: f32) -> Self {
        Progress {
            enabled,
            current: 0.0,
            last_print: 0.0,
            min_skip,
        }
    }

    /// Whether the meter prints.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Advances by `delta` percent of a part worth `max` percent (`max` 0: set to `delta`).
    pub fn print(&mut self, delta: f32, max: i32) {
        let mut current = if max == 0 {
            delta
        } else {
            self.current + delta / 100.0 * max as f32
        };
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + self.min_skip
            || current < self.last_print - self.min_skip
            || current == 0.0
            || current == 100.0
        {
            self.last_print = current;
            if self.enabled {
                outp!("    ({:3.2}/100%)\r", current);
                rqemu_cli::out::flush();
            }
        }
    }

    /// Ends the meter's line.
    pub fn end(&self) {
        if self.enabled {
            outp!("\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_in_single_precision() {
        let mut p = Progress::new(false, 2.0);
        p.print(0.0, 100);
        p.print(50.0, 100);
        assert_eq!(p.current, 50.0);
        p.print(80.0, 100);
        assert_eq!(p.current, 100.0);
    }
}

//! Format probing: which driver an image's first bytes belong to, as QEMU scores them.
//! `raw` is the fallback when nothing else matches.

/// Number of bytes probing reads from the start of an image.
pub const PROBE_BUF_SIZE: usize = 2048;

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Returns the QEMU name of the format `head` (the image's first bytes) is in.
/// `filename` breaks ties the way QEMU does (dmg is recognised by its suffix).
pub fn probe_format(head: &[u8], filename: &str) -> &'static str {
    if head.starts_with(b"QFI\xfb") {
        return match be32(head, 4) {
            Some(1) => "qcow",
            Some(v) if v >= 2 => "qcow2",
            _ => "raw",
        };
    }
    if head.starts_with(b"QED\0") {
        return "qed";
    }
    if head.starts_with(b"KDMV") || head.starts_with(b"COWD") {
        return "vmdk";
    }
    if head.starts_with(b"conectix") {
        return "vpc";
    }
    if head.starts_with(b"vhdxfile") {
        return "vhdx";
    }
    if head.starts_with(b"LUKS\xba\xbe") {
        return "luks";
    }
    if head.get(0x40..0x44) == Some(&[0x7f, 0x10, 0xda, 0xbe][..]) {
        return "vdi";
    }
    if head.starts_with(b"WithoutFreeSpace") || head.starts_with(b"WithouFreSpacExt") {
        return "parallels";
    }
    if head.starts_with(b"Bochs Virtual HD Image") {
        return "bochs";
    }
    if head.starts_with(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0") {
        return "cloop";
    }
    if head.starts_with(b"# Disk DescriptorFile") {
        return "vmdk";
    }
    if filename.ends_with(".dmg") {
        return "dmg";
    }
    "raw"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_magic() {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"QFI\xfb");
        h[7] = 3;
        assert_eq!(probe_format(&h, "x"), "qcow2");
        h[7] = 1;
        assert_eq!(probe_format(&h, "x"), "qcow");
        assert_eq!(probe_format(&[0u8; 512], "x"), "raw");
    }
}

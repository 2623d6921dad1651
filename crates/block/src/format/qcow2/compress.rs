//! Cluster compression: raw deflate (QEMU's "zlib", 4 KiB window, no zlib header) and
//! zstd (a plain zstd frame), as qcow2 stores them.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::types::CompressionType;

/// What compresses clusters for one image: its compression type and cluster size. It
/// holds no reference to the image, so callers can compress on any thread and hand the
/// result to [`crate::BlockBackend::write_precompressed`].
#[derive(Debug, Clone, Copy)]
pub struct Compressor {
    ty: CompressionType,
    cluster_size: usize,
}

impl Compressor {
    /// A compressor for clusters of `cluster_size` bytes.
    pub fn new(ty: CompressionType, cluster_size: usize) -> Self {
        Compressor { ty, cluster_size }
    }

    /// The cluster size compressed units cover.
    pub fn cluster_size(&self) -> usize {
        self.cluster_size
    }

    /// Compresses one cluster (or the image's shorter tail, padded with zeroes); `None`
    /// when it does not shrink below a cluster, so it is to be stored uncompressed.
    pub fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < self.cluster_size {
            let mut padded = vec![0u8; self.cluster_size];
            padded[..data.len()].copy_from_slice(data);
            compress(self.ty, &padded, self.cluster_size - 1)
        } else {
            compress(self.ty, &data[..self.cluster_size], self.cluster_size - 1)
        }
    }
}

/// Compresses `input` into at most `max_out` bytes; `None` if it does not fit (the
/// caller then writes the cluster uncompressed).
pub fn compress(ty: CompressionType, input: &[u8], max_out: usize) -> Option<Vec<u8>> {
    match ty {
        CompressionType::Zlib => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = vec![0u8; max_out];
            match c.compress(input, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => {
                    out.truncate(c.total_out() as usize);
                    Some(out)
                }
                _ => None,
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(input, 0).ok()?;
            (out.len() <= max_out).then_some(out)
        }
    }
}

/// Decompresses `input` into exactly `out.len()` bytes; `false` if the data is bad.
/// Trailing bytes after the compressed stream (padding up to a sector) are ignored.
pub fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> bool {
    match ty {
        CompressionType::Zlib => {
            let mut d = Decompress::new_with_window_bits(false, 12);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(Status::StreamEnd) | Ok(Status::Ok) | Ok(Status::BufError) => {
                    d.total_out() as usize == out.len()
                }
                Err(_) => false,
            }
        }
        CompressionType::Zstd => {
            // A streaming decoder stops when the output is full, like QEMU's, so
            // padding after the frame does not matter.
            let mut dec = match zstd::stream::raw::Decoder::new() {
                Ok(d) => d,
                Err(_) => return false,
            };
            use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before_in = inb.pos();
                let before_out = outb.pos();
                match dec.run(&mut inb, &mut outb) {
                    Ok(_) => {}
                    Err(_) => return false,
                }
                if outb.pos() == outb.capacity() {
                    return true;
                }
                if inb.pos() == before_in && outb.pos() == before_out {
                    return false;
                }
                if inb.pos() == input.len() && outb.pos() == before_out {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_both_types() {
        let mut data = vec![0u8; 65536];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 7) as u8;
        }
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(ty, &data, 65535).unwrap();
            let mut padded = c.clone();
            padded.extend_from_slice(&[0u8; 300]);
            let mut out = vec![0u8; 65536];
            assert!(decompress(ty, &padded, &mut out), "{ty:?}");
            assert_eq!(out, data);
            assert!(!decompress(ty, &[1, 2, 3], &mut out));
        }
    }

    #[test]
    fn incompressible_does_not_fit() {
        let mut x = 1u32;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &data, 65535).is_none());
    }
}

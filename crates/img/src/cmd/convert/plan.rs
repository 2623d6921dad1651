//! What each stretch of the target gets: the sources' allocation status cut into the
//! requests qemu-img makes (so the target's layout and the progress steps are qemu-img's).

use rqemu_block::error::{report, strerror};
use rqemu_block::status::{block_status, block_status_chain};

use super::copy::Job;

/// Largest request in sectors (QEMU's `BDRV_REQUEST_MAX_SECTORS`).
const REQUEST_MAX_SECTORS: u64 = (i32::MAX as u64) >> 9;

/// What a stretch of the target receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The sources' data.
    Data,
    /// Zeroes.
    Zero,
    /// Nothing: the target's backing file shows through.
    BackingFile,
}

/// One request: `n` sectors from `sector` with one status.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    /// First sector (of the concatenated sources and of the target).
    pub sector: u64,
    /// Length in sectors.
    pub n: u64,
    /// What the stretch gets.
    pub status: Status,
}

/// Walks the sources' status from the start, remembering the last answer.
pub struct Planner {
    next_status: u64,
    status: Status,
}

impl Planner {
    /// A planner at sector 0.
    pub fn new() -> Self {
        Planner {
            next_status: 0,
            status: Status::Data,
        }
    }

    /// The request starting at `sector_num`. Errors are reported here.
    pub async fn next(&mut self, job: &Job, sector_num: u64) -> Result<Chunk, ()> {
        let (src_cur, src_offset) = job.source_at(sector_num);
        let src = &job.sources[src_cur];
        let mut n = (job.total_sectors - sector_num)
            .min(REQUEST_MAX_SECTORS)
            .min(src.sectors - (sector_num - src_offset));
        let mut post_backing_zero = false;
        if let Some(tbs) = job.target_backing_sectors {
            if sector_num >= tbs {
                post_backing_zero = true;
            } else if sector_num + n > tbs {
                // From there on zeroes need no writing: split the request.
                n = tbs - sector_num;
            }
        }
        if self.next_status <= sector_num {
            let offset = (sector_num - src_offset) * 512;
            let (zero, data, count) = loop {
                let len = n * 512;
                let root = src.blk.root();
                let r = if job.target_has_backing {
                    block_status(root, offset, len).await
                } else {
                    block_status_chain(root, offset, len)
                        .await
                        .map(|c| c.status)
                };
                match r {
                    Ok(st) => break (st.zero, st.data, st.len),
                    Err(e) if job.salvage => {
                        if n == 1 {
                            if !job.quiet {
                                report(&format!(
                                    "warning: error while reading block status at offset \
                                     {offset}: {}",
                                    strerror(e.errno_value())
                                ));
                            }
                            break (false, true, 512);
                        }
                        n = n.div_ceil(4);
                    }
                    Err(e) => {
                        report(&format!(
                            "error while reading block status at offset {offset}: {}",
                            strerror(e.errno_value())
                        ));
                        return Err(());
                    }
                }
            };
            n = count.div_ceil(512).max(1);
            // Keep the next status query aligned to the source's clusters.
            let tail = (sector_num - src_offset + n) % src.alignment;
            if n > tail {
                n -= tail;
            }
            self.status = if zero {
                if post_backing_zero {
                    Status::BackingFile
                } else {
                    Status::Zero
                }
            } else if data {
                Status::Data
            } else if job.target_has_backing {
                Status::BackingFile
            } else {
                Status::Data
            };
            self.next_status = sector_num + n;
        }
        n = n.min(self.next_status - sector_num);
        let mut status = self.status;
        if status == Status::Data {
            n = n.min(job.buf_sectors);
        }
        // Compressed clusters are written whole: a short stretch takes its cluster along.
        if job.compressor.is_some() {
            if n < job.cluster_sectors {
                n = job.cluster_sectors.min(job.total_sectors - sector_num);
                status = Status::Data;
            } else {
                n -= n % job.cluster_sectors;
            }
        }
        self.status = status;
        Ok(Chunk {
            sector: sector_num,
            n,
            status,
        })
    }
}

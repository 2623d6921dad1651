//! The debug events format drivers and the request path announce to the node below them
//! (QEMU's `BlkdebugEvent`), by their QAPI names.

/// One debug event. Drivers fire them on their `file` child with
/// [`crate::node::BlockDriver::debug_event`]; only blkdebug nodes react.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Event {
    L1Update,
    L1GrowAllocTable,
    L1GrowWriteTable,
    L1GrowActivateTable,
    L2Load,
    L2Update,
    L2UpdateCompressed,
    L2AllocCowRead,
    L2AllocWrite,
    ReadAio,
    ReadBackingAio,
    ReadCompressed,
    WriteAio,
    WriteCompressed,
    VmstateLoad,
    VmstateSave,
    CowRead,
    CowWrite,
    ReftableLoad,
    ReftableGrow,
    ReftableUpdate,
    RefblockLoad,
    RefblockUpdate,
    RefblockUpdatePart,
    RefblockAlloc,
    RefblockAllocHookup,
    RefblockAllocWrite,
    RefblockAllocWriteBlocks,
    RefblockAllocWriteTable,
    RefblockAllocSwitchTable,
    ClusterAlloc,
    ClusterAllocBytes,
    ClusterFree,
    FlushToOs,
    FlushToDisk,
    PwritevRmwHead,
    PwritevRmwAfterHead,
    PwritevRmwTail,
    PwritevRmwAfterTail,
    Pwritev,
    PwritevZero,
    PwritevDone,
    EmptyImagePrepare,
    L1ShrinkWriteTable,
    L1ShrinkFreeL2Clusters,
    CorWrite,
    ClusterAllocSpace,
    None,
}

use Event::*;

/// Every event with its name, in QAPI order.
const NAMES: &[(Event, &str)] = &[
    (L1Update, "l1_update"),
    (L1GrowAllocTable, "l1_grow_alloc_table"),
    (L1GrowWriteTable, "l1_grow_write_table"),
    (L1GrowActivateTable, "l1_grow_activate_table"),
    (L2Load, "l2_load"),
    (L2Update, "l2_update"),
    (L2UpdateCompressed, "l2_update_compressed"),
    (L2AllocCowRead, "l2_alloc_cow_read"),
    (L2AllocWrite, "l2_alloc_write"),
    (ReadAio, "read_aio"),
    (ReadBackingAio, "read_backing_aio"),
    (ReadCompressed, "read_compressed"),
    (WriteAio, "write_aio"),
    (WriteCompressed, "write_compressed"),
    (VmstateLoad, "vmstate_load"),
    (VmstateSave, "vmstate_save"),
    (CowRead, "cow_read"),
    (CowWrite, "cow_write"),
    (ReftableLoad, "reftable_load"),
    (ReftableGrow, "reftable_grow"),
    (ReftableUpdate, "reftable_update"),
    (RefblockLoad, "refblock_load"),
    (RefblockUpdate, "refblock_update"),
    (RefblockUpdatePart, "refblock_update_part"),
    (RefblockAlloc, "refblock_alloc"),
    (RefblockAllocHookup, "refblock_alloc_hookup"),
    (RefblockAllocWrite, "refblock_alloc_write"),
    (RefblockAllocWriteBlocks, "refblock_alloc_write_blocks"),
    (RefblockAllocWriteTable, "refblock_alloc_write_table"),
    (RefblockAllocSwitchTable, "refblock_alloc_switch_table"),
    (ClusterAlloc, "cluster_alloc"),
    (ClusterAllocBytes, "cluster_alloc_bytes"),
    (ClusterFree, "cluster_free"),
    (FlushToOs, "flush_to_os"),
    (FlushToDisk, "flush_to_disk"),
    (PwritevRmwHead, "pwritev_rmw_head"),
    (PwritevRmwAfterHead, "pwritev_rmw_after_head"),
    (PwritevRmwTail, "pwritev_rmw_tail"),
    (PwritevRmwAfterTail, "pwritev_rmw_after_tail"),
    (Pwritev, "pwritev"),
    (PwritevZero, "pwritev_zero"),
    (PwritevDone, "pwritev_done"),
    (EmptyImagePrepare, "empty_image_prepare"),
    (L1ShrinkWriteTable, "l1_shrink_write_table"),
    (L1ShrinkFreeL2Clusters, "l1_shrink_free_l2_clusters"),
    (CorWrite, "cor_write"),
    (ClusterAllocSpace, "cluster_alloc_space"),
    (None, "none"),
];

impl Event {
    /// The event called `name`, if there is one.
    pub fn parse(name: &str) -> Option<Event> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(e, _)| *e)
    }

    /// QEMU's name of the event.
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(e, _)| *e == self)
            .map_or("none", |(_, n)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(NAMES.len(), 48);
        for (e, n) in NAMES {
            assert_eq!(Event::parse(n), Some(*e));
            assert_eq!(e.name(), *n);
        }
        assert_eq!(Event::parse("write_aio"), Some(WriteAio));
        assert_eq!(Event::parse("bogus"), Option::None);
    }
}

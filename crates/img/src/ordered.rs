//! Writing in order while reading ahead: the copy loops of `rebase` and `commit` read
//! their requests several at a time, finishing in any order, and write them one at a
//! time in request order (so the target's clusters are allocated in qemu-img's order),
//! with the reads going on while a write runs.
//!
//! Items that finish early wait here for the ones before them; what bounds them is the
//! callers' buffer pool (`bufpool.rs`): requests take their buffers in index order, so
//! the oldest request always holds its own and the others wait for the pool's budget.

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use futures::stream::{Stream, StreamExt};

/// Drives `reads`, a stream of `(index, item)` yielding every index from 0 up exactly
/// once, in any order (`None`: nothing to write there), and writes the items with
/// `write` in index order, one at a time. Reads go on while a write runs, and pause while
/// `max_backlog` items wait for the writer. `retired` is called with each index, in
/// order, once its write is done (at once for `None`). The first error ends the copy.
pub async fn write_in_order<T, E, F>(
    reads: impl Stream<Item = Result<(usize, Option<T>), E>>,
    max_backlog: usize,
    mut write: impl FnMut(T) -> F,
    mut retired: impl FnMut(usize),
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    let mut reads = pin!(reads);
    let mut waiting: BTreeMap<usize, Option<T>> = BTreeMap::new();
    let mut backlog = 0usize;
    let mut next = 0usize;
    let mut writing: Option<Pin<Box<F>>> = None;
    let mut reads_done = false;
    loop {
        while writing.is_none() {
            let Some(entry) = waiting.first_entry().filter(|e| *e.key() == next) else {
                break;
            };
            match entry.remove() {
                Some(item) => {
                    backlog -= 1;
                    writing = Some(Box::pin(write(item)));
                }
                None => {
                    retired(next);
                    next += 1;
                }
            }
        }
        if reads_done && writing.is_none() {
            debug_assert!(waiting.is_empty(), "an index was never read");
            return Ok(());
        }
        let may_read = !reads_done && (backlog < max_backlog || writing.is_none());
        let event = poll_fn(|cx| {
            if let Some(w) = writing.as_mut() {
                if let Poll::Ready(r) = w.as_mut().poll(cx) {
                    return Poll::Ready(Event::Wrote(r));
                }
            }
            if may_read {
                if let Poll::Ready(r) = reads.poll_next_unpin(cx) {
                    return Poll::Ready(Event::Read(r));
                }
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Wrote(r) => {
                writing = None;
                r?;
                retired(next);
                next += 1;
            }
            Event::Read(None) => reads_done = true,
            Event::Read(Some(r)) => {
                let (i, item) = r?;
                backlog += usize::from(item.is_some());
                waiting.insert(i, item);
            }
        }
    }
}

/// What the copy loop waits for next.
enum Event<W, R> {
    Wrote(W),
    Read(Option<R>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn writes_in_order_what_was_read_out_of_order() {
        let written = RefCell::new(Vec::new());
        let mut retired = Vec::new();
        let reads = futures::stream::iter([3, 0, 2, 4, 1])
            .map(|i| Ok::<_, ()>((i, (i % 2 == 0).then_some(i * 10))));
        let r = futures::executor::block_on(write_in_order(
            reads,
            1,
            |v| {
                written.borrow_mut().push(v);
                async { Ok(()) }
            },
            |i| retired.push(i),
        ));
        assert_eq!(r, Ok(()));
        assert_eq!(*written.borrow(), vec![0, 20, 40]);
        assert_eq!(retired, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn the_first_error_ends_the_copy() {
        let reads = futures::stream::iter([Ok((0, Some(1))), Ok((1, Some(2))), Err("read")]);
        let r = futures::executor::block_on(write_in_order(
            reads,
            4,
            |v| async move {
                if v == 2 {
                    Err("write")
                } else {
                    Ok(())
                }
            },
            |_| {},
        ));
        assert!(r.is_err());
    }
}

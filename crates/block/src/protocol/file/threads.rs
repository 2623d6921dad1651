//! `aio=threads`: a process-wide pool of worker threads running blocking calls.
//!
//! Workers are started on demand up to [`MAX_WORKERS`] (QEMU's pool has the same cap) and
//! stay for the life of the process.

use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::engine::{Engine, IoFuture, Op, Slot};

/// Upper bound on worker threads.
pub(crate) const MAX_WORKERS: usize = 64;

struct Job {
    fd: RawFd,
    op: Op,
    slot: Arc<Slot>,
}

#[derive(Default)]
struct Queue {
    jobs: std::collections::VecDeque<Job>,
    idle: usize,
    workers: usize,
}

/// The worker pool.
pub(crate) struct ThreadPool {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl ThreadPool {
    /// The process-wide pool.
    pub(crate) fn global() -> &'static Arc<ThreadPool> {
        static POOL: OnceLock<Arc<ThreadPool>> = OnceLock::new();
        POOL.get_or_init(|| {
            Arc::new(ThreadPool {
                queue: Mutex::new(Queue::default()),
                ready: Condvar::new(),
            })
        })
    }

    fn worker(self: Arc<Self>) {
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    q.idle += 1;
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                    q.idle -= 1;
                }
            };
            // SAFETY: the job was queued by `submit`, whose caller keeps the operation's
            // memory valid until its future completes, which `complete` below signals.
            let result = unsafe { job.op.run_blocking(job.fd) };
            job.slot.complete(result);
        }
    }
}

impl Engine for Arc<ThreadPool> {
    unsafe fn submit(&self, fd: RawFd, op: Op) -> IoFuture {
        let slot = Slot::new();
        let spawn = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.jobs.push_back(Job {
                fd,
                op,
                slot: slot.clone(),
            });
            let spawn = q.idle < q.jobs.len() && q.workers < MAX_WORKERS;
            if spawn {
                q.workers += 1;
            }
            spawn
        };
        if spawn {
            let pool = self.clone();
            let started = std::thread::Builder::new()
                .name("rqemu-io-worker".into())
                .spawn(move || pool.worker());
            if started.is_err() {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                q.workers -= 1;
                if q.workers == 0 {
                    // No thread can run the job: run it here rather than never.
                    if let Some(job) = q.jobs.pop_back() {
                        drop(q);
                        // SAFETY: as in `worker`: the caller of `submit` keeps the
                        // memory valid until the slot completes.
                        job.slot.complete(unsafe { job.op.run_blocking(job.fd) });
                    }
                }
            }
        } else {
            self.ready.notify_one();
        }
        IoFuture::new(slot)
    }
}

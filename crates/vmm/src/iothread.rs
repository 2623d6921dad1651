//! I/O threads: each runs a single-threaded async runtime on which virtio queues are
//! served and block requests run (QEMU's IOThread / AioContext). The `main` one always
//! exists; `-object iothread,id=X` adds more.

use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// A running I/O thread.
pub struct IoThread {
    /// Its id (`main` for the default one).
    pub id: String,
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts a thread named after `id`.
    pub fn spawn(id: &str) -> Result<IoThread> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::io(format!("cannot create iothread '{id}'")))?;
        let handle = rt.handle().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("iothread-{id}"))
            .spawn(move || {
                rt.block_on(async {
                    let _ = rx.await;
                });
            })
            .map_err(Error::io(format!("cannot start iothread '{id}'")))?;
        Ok(IoThread {
            id: id.to_string(),
            handle,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// The runtime to spawn work on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

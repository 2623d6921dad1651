//! The state of an rqemu-io session: the open image and the asynchronous requests still
//! in flight.

use rqemu_block::{BlockBackend, OpenOptions};

/// An rqemu-io session.
pub struct State {
    /// Program name for messages.
    pub prog: String,
    /// The open image.
    pub blk: Option<BlockBackend>,
    /// How it was opened (for `reopen`).
    pub opts: Option<OpenOptions>,
    /// Asynchronous requests not yet waited for.
    pub aio: Vec<tokio::task::JoinHandle<()>>,
    /// Started with `--image-opts`: `open` takes an option string too.
    pub image_opts: bool,
}

impl State {
    /// A session with no image.
    pub fn new(prog: String) -> State {
        State {
            prog,
            blk: None,
            opts: None,
            aio: Vec::new(),
            image_opts: false,
        }
    }

    /// Opens an image (closing the previous one).
    pub async fn open(&mut self, opts: OpenOptions, _label: &str) -> rqemu_block::Result<()> {
        if self.blk.is_some() {
            self.close().await;
        }
        let blk = BlockBackend::open(&opts).await?;
        self.blk = Some(blk);
        self.opts = Some(opts);
        Ok(())
    }

    /// Waits for every asynchronous request.
    pub async fn drain(&mut self) {
        for h in std::mem::take(&mut self.aio) {
            let _ = h.await;
        }
    }

    /// Drains and closes the image.
    pub async fn close(&mut self) {
        self.drain().await;
        if let Some(b) = self.blk.take() {
            if let Err(e) = b.close().await {
                eprintln!("{}: Failed to close the image: {e}", self.prog);
            }
        }
    }

    /// Prints `prog: msg` to stderr.
    pub fn error(&self, msg: &str) {
        eprintln!("{}: {msg}", self.prog);
    }
}

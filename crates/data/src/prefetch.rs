//! Bounded prefetch: building the next batches on a background thread while the current one
//! is being computed on.
//!
//! Decoding and augmenting a batch of real images takes about as long as a training step on a
//! GPU; doing both in turn leaves each idle half of the time. [`Prefetch`] builds up to `depth`
//! batches ahead on a producer thread (each batch itself decoded in parallel by the loader) and
//! hands them over in order. The batches are exactly those of [`Loader::batch`] with the same
//! arguments, so prefetching never changes results. Dropping the iterator stops the producer.
//!
//! The iterator also measures how long its consumer waited for the producer
//! ([`Prefetch::input_wait`]): the share of a training epoch spent waiting for decoded batches
//! says whether the input pipeline or the network is the limit.
//!
//! The producer builds host tensors only; each batch moves to the device on the consumer's
//! thread, when it is taken. candle's CUDA device issues work on the calling thread's own
//! stream (the per-thread default stream), so a copy made on the producer thread would not be
//! ordered with the consumer's kernels.

use crate::error::Result;
use crate::loader::{Augment, Loader};
use candle_core::{Device, Tensor};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How many built batches the training and evaluation loops let wait, besides the one being
/// built and those being consumed (one, or SimNet's source and target two): enough to keep
/// the device fed through an uneven decode, while bounding host memory.
pub const DEPTH: usize = 2;

/// One prefetched batch: its ids and its tensor.
pub type Batch = Result<(Vec<u32>, Tensor)>;

/// An iterator over `(ids, tensor)` of batches built ahead of use.
pub struct Prefetch {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
    device: Device,
    started: Instant,
    waited: Duration,
}

/// How long a consumer waited for its batches, out of how long it has run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InputWait {
    /// Time spent blocked on the producer, seconds.
    pub waited_s: f64,
    /// Time since the iterator was made, seconds.
    pub elapsed_s: f64,
}

impl InputWait {
    /// `waited / elapsed` (0 before any time has passed).
    pub fn share(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            (self.waited_s / self.elapsed_s).min(1.0)
        } else {
            0.0
        }
    }

    /// The log line's words: `waited 1.2 s of 10.3 s for decoded batches (12 %)`.
    pub fn describe(&self) -> String {
        format!(
            "waited {:.1} s of {:.1} s for decoded batches ({:.0} %)",
            self.waited_s,
            self.elapsed_s,
            100.0 * self.share()
        )
    }
}

impl Loader {
    /// Builds `batches[i]` with seed `seeds[i]` on a background thread, at most `depth` batches
    /// ahead of the consumer (at least one), and yields them in order on `device` (copied there
    /// by the consumer's thread).
    pub fn prefetch(
        &self,
        batches: Vec<Vec<u32>>,
        seeds: Vec<u64>,
        aug: Augment,
        depth: usize,
        device: &Device,
    ) -> Prefetch {
        assert_eq!(batches.len(), seeds.len(), "one seed per batch");
        let (tx, rx) = sync_channel(depth.max(1));
        let loader = self.clone();
        let handle = std::thread::spawn(move || {
            for (ids, seed) in batches.into_iter().zip(seeds) {
                let item = loader
                    .batch(&ids, aug, seed, &Device::Cpu)
                    .map(|t| (ids, t));
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        Prefetch {
            rx: Some(rx),
            handle: Some(handle),
            device: device.clone(),
            started: Instant::now(),
            waited: Duration::ZERO,
        }
    }

    /// [`Loader::prefetch`] of `batches` with the test transform, which draws nothing (so no
    /// seeds), [`DEPTH`] ahead: what the evaluation loops read.
    pub fn prefetch_test(&self, batches: Vec<Vec<u32>>, device: &Device) -> Prefetch {
        let seeds = vec![0; batches.len()];
        self.prefetch(batches, seeds, Augment::Test, DEPTH, device)
    }
}

impl Prefetch {
    /// How long the consumer has waited for batches so far, out of the iterator's lifetime.
    pub fn input_wait(&self) -> InputWait {
        InputWait {
            waited_s: self.waited.as_secs_f64(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

impl Iterator for Prefetch {
    type Item = Batch;

    fn next(&mut self) -> Option<Self::Item> {
        let asked = Instant::now();
        let received = self.rx.as_ref()?.recv();
        self.waited += asked.elapsed();
        match received {
            Ok(item) => Some(item.and_then(|(ids, t)| Ok((ids, t.to_device(&self.device)?)))),
            Err(_) => {
                // The producer is done. If it panicked, the panic goes on here rather than
                // ending the iteration early as if the batches had run out.
                self.rx.take();
                if let Some(Err(panic)) = self.handle.take().map(JoinHandle::join) {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Closing the channel makes the producer's next send fail, so it stops; then wait
        // for it so that no thread outlives the iterator.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

//! Where the host's time goes while it issues a training step's work, by kind of call.
//!
//! Why it exists: at batch 8 a ResNet-50 training step on an H100 took 22 ms against 36 ms at
//! batch 64 for eight times the images (BENCHMARKS.md, run 9), so the host, not the GPU,
//! bounds it; Nsight Systems, which would show where, does not run on the lent machines. With
//! `SIMTRANS_HOST_PROFILE=1` the CUDA path times its own calls with the host clock ([`timed`])
//! and `bench` reports the totals of each phase ([`take`]); what a phase's issue time has
//! beyond them is candle's own work. Off (the default), [`timed`] costs one atomic load.
//!
//! Labels nest: an outer one (the whole fused chain, say) includes the inner ones (its
//! convolutions and kernel launches).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

/// 0: not read yet; 1: off; 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static TOTALS: RefCell<BTreeMap<&'static str, (u64, f64)>> =
        const { RefCell::new(BTreeMap::new()) };
}

/// Whether calls are timed: `SIMTRANS_HOST_PROFILE=1`, unless [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("SIMTRANS_HOST_PROFILE").as_deref() == Ok("1");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns the timing on or off for the whole process.
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Runs `f`; when timing is on, adds one call and its host time to `what` (this thread's).
pub fn timed<T>(what: &'static str, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let start = Instant::now();
    let out = f();
    add(what, start.elapsed().as_secs_f64());
    out
}

/// Times the scope it lives in: [`timed`] for code that returns early with `?`.
pub struct Timer(Option<(&'static str, Instant)>);

impl Timer {
    /// Starts timing `what` (nothing when timing is off).
    pub fn start(what: &'static str) -> Self {
        Timer(enabled().then(|| (what, Instant::now())))
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((what, start)) = self.0.take() {
            add(what, start.elapsed().as_secs_f64());
        }
    }
}

fn add(what: &'static str, secs: f64) {
    TOTALS.with(|t| {
        let mut t = t.borrow_mut();
        let e = t.entry(what).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += secs;
    });
}

/// This thread's totals since the last call, `label → (calls, seconds)`, and resets them.
pub fn take() -> BTreeMap<String, (u64, f64)> {
    TOTALS.with(|t| {
        std::mem::take(&mut *t.borrow_mut())
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_calls_add_up_per_label_and_take_resets() {
        set_enabled(true);
        take();
        let v = timed("outer", || {
            timed("inner", || {
                std::thread::sleep(std::time::Duration::from_millis(2))
            });
            timed("inner", || 7)
        });
        assert_eq!(v, 7);
        let t = take();
        let (outer, inner) = (t["outer"], t["inner"]);
        assert_eq!((outer.0, inner.0), (1, 2));
        // The outer label includes the inner calls, and the sleep took at least 2 ms.
        assert!(inner.1 >= 0.002 && outer.1 >= inner.1, "{t:?}");
        assert!(take().is_empty());
        {
            let _t = Timer::start("scope");
        }
        assert_eq!(take()["scope"].0, 1);
        set_enabled(false);
        timed("off", || ());
        drop(Timer::start("off"));
        assert!(take().is_empty());
    }
}

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

/// Where a benchmarked step's time goes, phase by phase: each phase's work is issued, then the
/// device is waited for, so a phase's time includes its device work and nothing of the next.
///
/// Why it exists: a whole step's images per second says how far a row is from its target, not
/// where the time goes, and a lent GPU is rare. Each bench that times steps also times a few
/// extra steps through [`Phases::time`], and the table prints per phase its whole time, the
/// time until the host had issued its work (close to the whole: the host bounds the phase),
/// and, with `SIMTRANS_HOST_PROFILE=1`, the host's calls by kind ([`take`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Phases {
    /// The phases, in the order of a step.
    pub phase_names: Vec<String>,
    /// Seconds per step of each phase, its device work included.
    pub phase_seconds: Vec<f64>,
    /// Of each phase, the seconds per step until the host had issued all its work.
    pub issue_seconds: Vec<f64>,
    /// Of each phase, the host's calls per step by kind, `label → (calls, seconds)`; empty
    /// unless `SIMTRANS_HOST_PROFILE=1`.
    pub host_calls: Vec<BTreeMap<String, (f64, f64)>>,
    /// Steps timed so far.
    pub phase_steps: usize,
}

impl Phases {
    /// No time yet in phases `names`; drops this thread's host-call totals so far.
    pub fn new(names: &[&str]) -> Self {
        take();
        Phases {
            phase_names: names.iter().map(|n| n.to_string()).collect(),
            phase_seconds: vec![0.0; names.len()],
            issue_seconds: vec![0.0; names.len()],
            host_calls: vec![BTreeMap::new(); names.len()],
            phase_steps: 0,
        }
    }

    /// Runs phase `phase`'s `work`, waits for `device`, and adds both times and the host's
    /// calls to the phase. Phases of one step must be timed in order, one after another.
    pub fn time<T, E: From<candle_core::Error>>(
        &mut self,
        phase: usize,
        device: &candle_core::Device,
        work: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        if phase >= self.phase_names.len() {
            return Err(candle_core::Error::Msg(format!(
                "phase {phase} of {} ({:?})",
                self.phase_names.len(),
                self.phase_names
            ))
            .into());
        }
        let start = Instant::now();
        let out = work()?;
        let issued = start.elapsed().as_secs_f64();
        let calls = take();
        device.synchronize()?;
        let whole = start.elapsed().as_secs_f64();
        self.phase_seconds[phase] += whole;
        self.issue_seconds[phase] += issued;
        for (label, (n, secs)) in calls {
            let e = self.host_calls[phase].entry(label).or_insert((0.0, 0.0));
            e.0 += n as f64;
            e.1 += secs;
        }
        if phase + 1 == self.phase_names.len() {
            self.phase_steps += 1;
        }
        Ok(out)
    }

    /// The totals divided by the steps timed: seconds and calls per step.
    pub fn per_step(mut self) -> Self {
        let n = self.phase_steps.max(1) as f64;
        for v in self.phase_seconds.iter_mut().chain(&mut self.issue_seconds) {
            *v /= n;
        }
        for calls in &mut self.host_calls {
            for (count, secs) in calls.values_mut() {
                *count /= n;
                *secs /= n;
            }
        }
        self
    }
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

    #[test]
    fn phases_add_up_per_step_in_order() {
        let cpu = candle_core::Device::Cpu;
        let mut p = Phases::new(&["a", "b"]);
        for _ in 0..2 {
            let v: candle_core::Result<u8> = p.time(0, &cpu, || {
                std::thread::sleep(std::time::Duration::from_millis(3));
                Ok(1)
            });
            assert_eq!(v.unwrap(), 1);
            p.time::<_, candle_core::Error>(1, &cpu, || Ok(())).unwrap();
        }
        assert!(p.time::<_, candle_core::Error>(2, &cpu, || Ok(())).is_err());
        let p = p.per_step();
        assert_eq!(p.phase_steps, 2);
        // Phase a slept 3 ms per step; issuing cannot take longer than the whole phase.
        assert!(
            p.phase_seconds[0] >= 0.003 && p.phase_seconds[0] < 1.0,
            "{p:?}"
        );
        for (issued, whole) in p.issue_seconds.iter().zip(&p.phase_seconds) {
            assert!(*issued <= *whole, "{p:?}");
        }
    }
}

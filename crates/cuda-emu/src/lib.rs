//! Runs this project's own CUDA kernels (`crates/kernels/src/*.cu`) on the CPU, for tests.
//!
//! Why it exists: a GPU is lent to few sessions and never to CI, yet the kernels and the host
//! code that launches them ([`simtrans_ops::launch`]) change often. `build.rs` compiles the
//! `.cu` files unchanged as C++ against `shim/emu.h`, which stands in for CUDA's built-ins;
//! [`Emu`] implements [`Runner`], so the very launch sequences the GPU runs (grid, block,
//! argument list, kernel order) run here on host memory, and the tests compare their results
//! with references computed in f64.
//!
//! What it checks beyond the arithmetic: each launch's arguments against the kernel's C
//! signature (count and sizes), that the kernel lives in the file it was launched from, that
//! a block meets at `__syncthreads` and a warp at a shuffle as a whole, and that no kernel
//! writes outside the buffers it was given (guard bytes around every buffer, checked after
//! every launch); a kernel that crashes the process (an access far out of bounds, or a
//! misaligned vector access, which the GPU refuses too) first names itself on stderr. What it
//! cannot check: speed, memory ordering between blocks (blocks run one
//! after another), and the GPU's floating-point contraction (nvcc fuses multiply-adds; here
//! each operation rounds alone), so results agree with the GPU's to rounding, not bit for bit.

use candle_core::{bail, Result};
use simtrans_ops::launch::{Arg, Launch, Module, Runner};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CString};

extern "C" {
    fn emu_launch(
        module: *const c_char,
        name: *const c_char,
        gx: u32,
        gy: u32,
        bx: u32,
        args: *mut *mut c_void,
        sizes: *const usize,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Guard bytes before and after every buffer, and their value (not a NaN pattern, so a
/// kernel that writes a NaN it read from a guard is still caught).
const GUARD: usize = 256;
const GUARD_BYTE: u8 = 0xa5;
/// The fill of fresh memory: a NaN in f32, bf16 and f64, so that reading what nobody wrote
/// shows in the results.
const FILL: u8 = 0xff;

/// One buffer of "device" memory: `len` bytes between two guards, 8-byte aligned.
struct Region {
    words: Box<[u64]>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> Self {
        let words = vec![u64::from_ne_bytes([GUARD_BYTE; 8]); (2 * GUARD + len).div_ceil(8)];
        let mut r = Region {
            words: words.into_boxed_slice(),
            len,
        };
        r.bytes_mut()[GUARD..GUARD + len].fill(FILL);
        r
    }
    fn bytes(&self) -> &[u8] {
        let n = self.words.len() * 8;
        // SAFETY: the words are plain memory of n bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), n) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        let n = self.words.len() * 8;
        // SAFETY: as above, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), n) }
    }
    fn start(&self) -> u64 {
        self.words.as_ptr() as u64 + GUARD as u64
    }
    fn guards_intact(&self) -> bool {
        let b = self.bytes();
        let guard = |s: &[u8]| s.iter().all(|&x| x == GUARD_BYTE);
        guard(&b[..GUARD]) && guard(&b[GUARD + self.len..])
    }
}

/// The CPU emulator: owns every buffer it hands out (freed when it is dropped) and runs
/// launches one at a time, to completion.
#[derive(Default)]
pub struct Emu {
    regions: RefCell<Vec<Region>>,
    launches: RefCell<Vec<(&'static str, Launch)>>,
}

/// A plain value that a kernel reads or writes (f32, bf16, f64, u8, ...).
pub trait Plain: Copy + Default + 'static {}
impl<T: Copy + Default + 'static> Plain for T {}

impl Emu {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer holding `data`; its address.
    pub fn upload<T: Plain>(&self, data: &[T]) -> u64 {
        let bytes = std::mem::size_of_val(data);
        let mut r = Region::new(bytes);
        // SAFETY: T is plain data of `bytes` bytes.
        let src = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), bytes) };
        r.bytes_mut()[GUARD..GUARD + bytes].copy_from_slice(src);
        let at = r.start();
        self.regions.borrow_mut().push(r);
        at
    }

    /// A buffer of `n` values of `T`, every byte 0xff (NaN for floats); its address.
    pub fn alloc_of<T: Plain>(&self, n: usize) -> u64 {
        let r = Region::new(n * std::mem::size_of::<T>());
        let at = r.start();
        self.regions.borrow_mut().push(r);
        at
    }

    /// The `n` values of `T` at `at`, which must lie inside one buffer.
    pub fn download<T: Plain>(&self, at: u64, n: usize) -> Result<Vec<T>> {
        let bytes = n * std::mem::size_of::<T>();
        let regions = self.regions.borrow();
        let Some(r) = regions
            .iter()
            .find(|r| at >= r.start() && at + bytes as u64 <= r.start() + r.len as u64)
        else {
            bail!("emulator: no buffer holds {bytes} bytes at {at:#x}")
        };
        let off = GUARD + (at - r.start()) as usize;
        let mut out = vec![T::default(); n];
        // SAFETY: the range lies inside the region, and T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                r.bytes()[off..off + bytes].as_ptr(),
                out.as_mut_ptr().cast::<u8>(),
                bytes,
            )
        };
        Ok(out)
    }

    /// The kernels launched so far, in order, with their launch shapes.
    pub fn launches(&self) -> Vec<(&'static str, Launch)> {
        self.launches.borrow().clone()
    }
}

/// A scratch buffer of the emulator: its address (the memory stays with the [`Emu`]).
pub struct Scratch(u64);

impl Runner for Emu {
    type Buf = Scratch;
    fn alloc(&self, bytes: usize) -> Result<Scratch> {
        Ok(Scratch(self.alloc_of::<u8>(bytes)))
    }
    fn addr(&self, buf: &mut Scratch) -> u64 {
        buf.0
    }
    fn launch(&self, module: Module, name: &'static str, at: Launch, args: &[Arg]) -> Result<()> {
        let file = match module {
            Module::Bn => "bn",
            Module::Head => "head",
            Module::Pool => "pool",
            Module::Sgd => "sgd",
        };
        self.launch_in(file, name, at, args)
    }
}

impl Emu {
    /// Runs kernel `name` of `crates/kernels/src/{file}.cu`, or of `shim/selftest.cu` (the
    /// emulator's own test kernels) when `file` is `"selftest"`.
    pub fn launch_in(
        &self,
        file: &str,
        name: &'static str,
        at: Launch,
        args: &[Arg],
    ) -> Result<()> {
        // Each argument in its own 8-byte slot, read by the kernel with its parameter's type.
        let mut slots = vec![0u64; args.len()];
        let mut sizes = Vec::with_capacity(args.len());
        for (slot, a) in slots.iter_mut().zip(args) {
            let bytes: &[u8] = match a {
                Arg::Ptr(v) => &v.to_ne_bytes(),
                Arg::I32(v) => &v.to_ne_bytes(),
                Arg::I64(v) => &v.to_ne_bytes(),
                Arg::F32(v) => &v.to_ne_bytes(),
                Arg::F64(v) => &v.to_ne_bytes(),
            };
            let mut raw = [0u8; 8];
            raw[..bytes.len()].copy_from_slice(bytes);
            *slot = u64::from_ne_bytes(raw);
            sizes.push(bytes.len());
        }
        let mut ptrs: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        let (m, n) = (
            CString::new(file).expect("no NUL"),
            CString::new(name).expect("no NUL"),
        );
        let mut err = vec![0 as c_char; 512];
        // SAFETY: the argument slots outlive the call, and the kernels were checked (count
        // and sizes) against their signatures by emu_launch before running; what they write
        // is checked against the guards below.
        let rc = unsafe {
            emu_launch(
                m.as_ptr(),
                n.as_ptr(),
                at.grid.0,
                at.grid.1,
                at.block,
                ptrs.as_mut_ptr(),
                sizes.as_ptr(),
                args.len(),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: emu_launch NUL-terminates its message within the buffer.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            bail!("emulator: {}", msg.to_string_lossy())
        }
        self.launches.borrow_mut().push((name, at));
        if self.regions.borrow().iter().any(|r| !r.guards_intact()) {
            bail!("emulator: {name} wrote outside the buffers it was given")
        }
        Ok(())
    }
}

//! Compiles `shim/emu.cpp`, which includes the CUDA sources of `crates/kernels/src` unchanged, as
//! C++ (C++17, without floating-point contraction, so `__fadd_rn` and friends round as on the
//! GPU). Needs only a C++ compiler.

fn main() {
    println!("cargo::rerun-if-changed=shim");
    println!("cargo::rerun-if-changed=../kernels/src");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("shim/emu.cpp")
        .include("shim")
        .include("../kernels/src")
        .flag_if_supported("-ffp-contract=off")
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-function")
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .compile("simtrans_cuda_emu");
}

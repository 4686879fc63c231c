//! Compile-time facts the runtime SIMD dispatch depends on.
//!
//! `target_feature(enable = "avx512f")` is stable from rustc 1.89; the
//! crate's `rust-version` is older (Debian 13's rustc is 1.85). On a new
//! enough compiler `sere_avx512` is set and the row kernels gain an
//! AVX-512 copy; older compilers build the AVX2 + FMA copy only.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sere_avx512)");
    if autocfg::new().probe_rustc_version(1, 89) {
        println!("cargo::rustc-cfg=sere_avx512");
    }
}

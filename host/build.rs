//! Compile-time facts the CPU backend's code paths depend on.
//!
//! AVX-512 intrinsics and `target_feature(enable = "avx512f")` are stable
//! from rustc 1.89; the crate's `rust-version` is older (Debian 13's
//! rustc is 1.85). On a new enough compiler `sere_avx512` is set and the
//! SGEMM gains its AVX-512 tile; older compilers build the AVX2 tile only.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sere_avx512)");
    let ac = autocfg::new();
    if ac.probe_rustc_version(1, 89) {
        println!("cargo::rustc-cfg=sere_avx512");
    }
}

//! `probe()` and `Gpu::new()` never panic: on a machine without a GPU, the
//! driver, NVRTC or cuBLAS they return an error whose message is one line
//! saying what is missing.

#[test]
fn probe_and_gpu_new_explain_what_is_missing() {
    match sere_cuda::probe() {
        Ok(info) => println!("probe: {info}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
            println!("probe: {msg}");
        }
    }
    match sere_cuda::Gpu::new(0) {
        Ok(gpu) => println!("Gpu::new(0): {}", gpu.info()),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty() && !msg.contains('\n'), "{msg:?}");
            println!("Gpu::new(0): {msg}");
        }
    }
    // A device that cannot exist is always an error.
    assert!(sere_cuda::Gpu::new(10_000).is_err());
}

#[test]
fn kernels_are_built_in() {
    assert!(!sere_cuda::compile::KERNEL_FILES.is_empty());
}

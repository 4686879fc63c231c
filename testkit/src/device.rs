//! The GPU tests' convention: skip with one line where the device is
//! missing, fail instead where `SERE_REQUIRE_GPU` asks for it.

/// The variable that turns a missing GPU into a failure (cuda/gpu-check.sh
/// sets it).
///
/// ```
/// assert_eq!(sere_testkit::REQUIRE_GPU, "SERE_REQUIRE_GPU");
/// ```
pub const REQUIRE_GPU: &str = "SERE_REQUIRE_GPU";

/// Whether the environment variable `var` is set, not empty and not `0`.
///
/// ```
/// assert!(!sere_testkit::required("SERE_TESTKIT_DOC_NEVER_SET"));
/// ```
pub fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Opens a device with `open`; on an error, panics with the reason where
/// [`REQUIRE_GPU`] is [`required`], else prints `skipped: <what>: <reason>`
/// (the line cuda/gpu-check.sh counts) and returns `None`.
///
/// ```
/// use sere_testkit::{device_or_skip, required, REQUIRE_GPU};
///
/// assert_eq!(device_or_skip("CUDA", || Ok::<_, String>(7)), Some(7));
/// if !required(REQUIRE_GPU) {
///     // Prints `skipped: CUDA: no driver`.
///     assert!(device_or_skip("CUDA", || Err::<u8, _>("no driver")).is_none());
/// }
/// ```
pub fn device_or_skip<T, E: std::fmt::Display>(
    what: &str,
    open: impl FnOnce() -> Result<T, E>,
) -> Option<T> {
    match open() {
        Ok(device) => Some(device),
        Err(e) => {
            if required(REQUIRE_GPU) {
                panic!("{REQUIRE_GPU} is set, but {what}: {e}");
            }
            println!("skipped: {what}: {e}");
            None
        }
    }
}

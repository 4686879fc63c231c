//! Every kernel source compiles with NVRTC to PTX for `compute_90` and
//! assembles with `ptxas -arch=sm_90 -v` without errors; prints registers,
//! spills, stack and shared memory per kernel (the table in cuda/README.md).
//!
//! Needs NVRTC 13.0 (`libnvrtc.so.13` on LD_LIBRARY_PATH) and `ptxas`
//! (`SERE_PTXAS` or on PATH): `scripts/test.sh` installs both from PyPI.
//! Without them the test prints one `skipped:` line and passes, unless
//! `SERE_REQUIRE_NVRTC=1` (CI), where their absence is a failure.

use sere_cuda::compile::{
    compile_image, compile_ptx_logged, nvrtc_version, KernelFormat, KERNEL_FILES,
};
use std::path::PathBuf;
use std::process::Command;

fn required() -> bool {
    sere_testkit::required("SERE_REQUIRE_NVRTC")
}

/// Skips (or fails, when required) with a one-line reason.
fn unavailable(reason: &str) {
    if required() {
        panic!("SERE_REQUIRE_NVRTC is set, but {reason}");
    }
    println!("skipped: {reason}");
}

fn ptxas() -> Option<PathBuf> {
    let cand = std::env::var_os("SERE_PTXAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("ptxas"));
    Command::new(&cand)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cand)
}

/// The file the dynamic loader mapped for libnvrtc (to show which one
/// cudarc picked up).
fn loaded_nvrtc() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("libnvrtc.") && !p.contains("builtins"))
        .map(str::to_string)
}

#[derive(Debug, Default, Clone)]
struct Usage {
    name: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// Parses `ptxas -v` output into one record per entry function.
fn parse_ptxas(log: &str) -> Vec<Usage> {
    let num_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut out: Vec<Usage> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Usage {
                name,
                ..Usage::default()
            });
        } else if let Some(u) = out.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = num_before(line, "registers").unwrap_or(0);
                u.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[test]
fn every_kernel_compiles_to_ptx_and_assembles_for_sm_90() {
    let version = match nvrtc_version() {
        Ok(v) => v,
        Err(e) => return unavailable(&e.to_string()),
    };
    let lib = loaded_nvrtc().unwrap_or_else(|| "?".into());
    println!("NVRTC {}.{} from {lib}", version.0, version.1);
    let Some(ptxas) = ptxas() else {
        return unavailable("ptxas not found (set SERE_PTXAS or put it on PATH)");
    };
    println!("ptxas {}", ptxas.display());
    if required() {
        assert_eq!(
            version,
            (13, 0),
            "CI pins NVRTC 13.0 (newer NVRTC emits PTX the 580 driver rejects); loaded {lib}"
        );
    }
    let dir = std::env::temp_dir().join(format!("sere-cuda-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut table = Vec::new();
    for file in KERNEL_FILES {
        let (ptx, log) =
            compile_ptx_logged(file, 90).unwrap_or_else(|e| panic!("{}: {e}", file.name));
        assert!(
            !log.to_lowercase().contains("warning"),
            "{}: NVRTC warnings:\n{log}",
            file.name
        );
        assert!(
            ptx.contains(".target sm_90"),
            "{}: PTX is not for sm_90",
            file.name
        );
        for entry in file.entries {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "{}: no PTX entry {entry}",
                file.name
            );
        }
        let ptx_path = dir.join(file.name.replace(".cu", ".ptx"));
        std::fs::write(&ptx_path, &ptx).unwrap();
        let out = Command::new(&ptxas)
            .arg("-arch=sm_90")
            .arg("-v")
            .arg(&ptx_path)
            .arg("-o")
            .arg(ptx_path.with_extension("cubin"))
            .output()
            .expect("run ptxas");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "ptxas failed on {}:\n{log}",
            file.name
        );
        assert!(
            !log.contains("error") && !log.contains("warning"),
            "ptxas on {}:\n{log}",
            file.name
        );
        let usage = parse_ptxas(&log);
        for entry in file.entries {
            assert!(
                usage.iter().any(|u| u.name == *entry),
                "ptxas did not report {entry}:\n{log}"
            );
        }
        for u in usage {
            table.push((file.name, u));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("| file | kernel | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (f, u) in &table {
        println!(
            "| {f} | `{}` | {} | {} | {} | {} | {} |",
            u.name, u.registers, u.stack, u.spill_stores, u.spill_loads, u.smem
        );
    }
    // The CUBIN fallback (NVRTC newer than the driver) compiles too.
    for file in KERNEL_FILES {
        let (cubin, _) = compile_image(file, 90, KernelFormat::Cubin)
            .unwrap_or_else(|e| panic!("{} (cubin): {e}", file.name));
        assert_eq!(&cubin[..4], b"\x7fELF", "{}: not an ELF cubin", file.name);
    }
    let spilling: Vec<_> = table
        .iter()
        .filter(|(_, u)| u.spill_stores > 0 || u.spill_loads > 0)
        .map(|(_, u)| u.name.as_str())
        .collect();
    assert!(spilling.is_empty(), "kernels spill registers: {spilling:?}");
}

//! Parity of every CUDA kernel with sere-core on seeded random inputs of
//! several shapes, including sizes that are not multiples of the block
//! sizes (32, 256, 1024). Backward buffers start non-zero on both sides, so
//! the "adds into" contract is checked too.
//!
//! Error measure, per output buffer: `max |gpu - cpu| / max |cpu|` (the
//! error relative to the buffer's largest magnitude; an element-wise
//! relative error is meaningless for entries that cancel to ~0). It must be
//! below 1e-5 in f32. cuBLAS runs in its default math mode (full FP32, no
//! TF32).
//!
//! Without a GPU (or without the driver, NVRTC or cuBLAS) every test prints
//! one `skipped: <reason>` line and passes, unless `SERE_REQUIRE_GPU=1`
//! (cuda/gpu-check.sh sets it), where that is a failure.

use sere_core::bilinear::{MapLayout, SampleShape};
use sere_core::linalg::MatRef;
use sere_core::loss::DinoShape;
use sere_core::optim::AdamW;
use sere_cuda::{CudaSlice, Gpu, MatView};
use sere_testkit::Rng;

const TOL: f64 = 1e-5;

/// The GPU, or `None` after printing why there is none (a failure when
/// `SERE_REQUIRE_GPU` is set).
fn gpu() -> Option<Gpu> {
    sere_testkit::device_or_skip("CUDA", || Gpu::new(0))
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Uploads `inputs` and the initial `outputs`, runs `on_gpu`, downloads the
/// outputs, runs `on_cpu` (sere-core) on host copies of the same initial
/// outputs, and compares every output buffer.
fn check(
    gpu: &Gpu,
    what: &str,
    inputs: &[&[f32]],
    outputs: &[(&str, Vec<f32>)],
    on_gpu: impl FnOnce(&Gpu, &[CudaSlice<f32>], &mut [CudaSlice<f32>]),
    on_cpu: impl FnOnce(&[&[f32]], &mut [Vec<f32>]),
) {
    let din: Vec<CudaSlice<f32>> = inputs.iter().map(|v| gpu.upload(v).unwrap()).collect();
    let mut dout: Vec<CudaSlice<f32>> = outputs
        .iter()
        .map(|(_, v)| gpu.upload(v).unwrap())
        .collect();
    on_gpu(gpu, &din, &mut dout);
    let got: Vec<Vec<f32>> = dout.iter().map(|d| gpu.download(d).unwrap()).collect();
    let mut want: Vec<Vec<f32>> = outputs.iter().map(|(_, v)| v.clone()).collect();
    on_cpu(inputs, &mut want);
    for (((name, _), g), w) in outputs.iter().zip(&got).zip(&want) {
        let e = rel_err(g, w);
        println!("{what}: {name}: relative error {e:.2e}");
        assert!(e < TOL, "{what}: `{name}` relative error {e:e} >= {TOL:e}");
    }
}

#[test]
fn grid_sample_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    for (c, h, w, p) in [
        (3, 5, 7, 11),
        (37, 14, 14, 169),
        (70, 9, 13, 36),
        (1, 1, 1, 1),
    ] {
        for layout in [MapLayout::Chw, MapLayout::Hwc] {
            let shape = SampleShape {
                channels: c,
                height: h,
                width: w,
                points: p,
            };
            let what = format!("grid_sample {c}x{h}x{w} P={p} {layout:?}");
            let map = rng.uniforms(c * h * w, -1.0, 1.0);
            // Some points outside [-1, 1]: partly and fully padded.
            let grid = rng.uniforms(2 * p, -1.2, 1.2);
            let gout = rng.uniforms(c * p, -1.0, 1.0);
            check(
                &g,
                &format!("{what} forward"),
                &[&map, &grid],
                &[("out", vec![0.0; c * p])],
                |g, i, o| {
                    g.grid_sample_forward(&i[0], &i[1], shape, layout, &mut o[0])
                        .unwrap()
                },
                |i, o| {
                    sere_core::bilinear::grid_sample_forward(i[0], i[1], shape, layout, &mut o[0])
                        .unwrap()
                },
            );
            check(
                &g,
                &format!("{what} backward"),
                &[&map, &grid, &gout],
                &[
                    ("grad_map", rng.uniforms(c * h * w, -1.0, 1.0)),
                    ("grad_grid", rng.uniforms(2 * p, -1.0, 1.0)),
                ],
                |g, i, o| {
                    let [gm, gg] = o else { unreachable!() };
                    g.grid_sample_backward(&i[0], &i[1], &i[2], shape, layout, gm, gg)
                        .unwrap()
                },
                |i, o| {
                    let [gm, gg] = o else { unreachable!() };
                    sere_core::bilinear::grid_sample_backward(
                        i[0],
                        i[1],
                        i[2],
                        shape,
                        layout,
                        gm,
                        Some(gg.as_mut_slice()),
                    )
                    .unwrap()
                },
            );
            check(
                &g,
                &format!("{what} backward (map only)"),
                &[&map, &grid, &gout],
                &[("grad_map", rng.uniforms(c * h * w, -1.0, 1.0))],
                |g, i, o| {
                    g.grid_sample_backward_map(&i[1], &i[2], shape, layout, &mut o[0])
                        .unwrap()
                },
                |i, o| {
                    sere_core::bilinear::grid_sample_backward(
                        i[0], i[1], i[2], shape, layout, &mut o[0], None,
                    )
                    .unwrap()
                },
            );
        }
    }
}

#[test]
fn spatial_relation_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(2);
    for (batch, n, c, heads) in [(1, 7, 6, 2), (3, 169, 48, 3), (2, 36, 20, 4), (1, 1, 1, 1)] {
        let what = format!("spatial_relation b={batch} n={n} c={c} heads={heads}");
        let x = rng.uniforms(batch * n * c, -1.0, 1.0);
        let gl = rng.uniforms(batch * heads * n * n, -1.0, 1.0);
        let per_x = n * c;
        let per_l = heads * n * n;
        check(
            &g,
            &format!("{what} forward"),
            &[&x],
            &[("logits", vec![0.0; batch * per_l])],
            |g, i, o| {
                g.spatial_relation_forward(&i[0], batch, n, c, heads, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                for b in 0..batch {
                    sere_core::relation::spatial_relation_forward(
                        &i[0][b * per_x..(b + 1) * per_x],
                        n,
                        c,
                        heads,
                        &mut o[0][b * per_l..(b + 1) * per_l],
                    )
                    .unwrap();
                }
            },
        );
        check(
            &g,
            &format!("{what} backward"),
            &[&x, &gl],
            &[("grad_x", rng.uniforms(batch * per_x, -1.0, 1.0))],
            |g, i, o| {
                g.spatial_relation_backward(&i[0], &i[1], batch, n, c, heads, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                for b in 0..batch {
                    sere_core::relation::spatial_relation_backward(
                        &i[0][b * per_x..(b + 1) * per_x],
                        &i[1][b * per_l..(b + 1) * per_l],
                        n,
                        c,
                        heads,
                        &mut o[0][b * per_x..(b + 1) * per_x],
                    )
                    .unwrap();
                }
            },
        );
    }
}

#[test]
fn channel_relation_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    for (batch, n, c) in [(1, 7, 5), (2, 169, 40), (3, 36, 33), (1, 1, 1)] {
        let what = format!("channel_relation b={batch} n={n} c={c}");
        let x = rng.uniforms(batch * n * c, -1.0, 1.0);
        let gl = rng.uniforms(batch * c * c, -1.0, 1.0);
        let (per_x, per_l) = (n * c, c * c);
        check(
            &g,
            &format!("{what} forward"),
            &[&x],
            &[("logits", vec![0.0; batch * per_l])],
            |g, i, o| {
                g.channel_relation_forward(&i[0], batch, n, c, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                for b in 0..batch {
                    sere_core::relation::channel_relation_forward(
                        &i[0][b * per_x..(b + 1) * per_x],
                        n,
                        c,
                        &mut o[0][b * per_l..(b + 1) * per_l],
                    )
                    .unwrap();
                }
            },
        );
        check(
            &g,
            &format!("{what} backward"),
            &[&x, &gl],
            &[("grad_x", rng.uniforms(batch * per_x, -1.0, 1.0))],
            |g, i, o| {
                g.channel_relation_backward(&i[0], &i[1], batch, n, c, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                for b in 0..batch {
                    sere_core::relation::channel_relation_backward(
                        &i[0][b * per_x..(b + 1) * per_x],
                        &i[1][b * per_l..(b + 1) * per_l],
                        n,
                        c,
                        &mut o[0][b * per_x..(b + 1) * per_x],
                    )
                    .unwrap();
                }
            },
        );
    }
}

const ROW_SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (3, 31),
    (17, 197),
    (9, 33),
    (5, 1000),
    (2, 4097),
    (3, 70_000),
];

#[test]
fn softmax_and_log_softmax_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    for (rows, cols) in ROW_SHAPES {
        for amp in [3.0f32, 1e3] {
            let what = format!("softmax {rows}x{cols} |x|<{amp}");
            let n = rows * cols;
            let x = rng.uniforms(n, -amp, amp);
            check(
                &g,
                &format!("{what} forward"),
                &[&x],
                &[("out", vec![0.0; n])],
                |g, i, o| g.softmax_rows(&i[0], rows, cols, &mut o[0]).unwrap(),
                |i, o| sere_core::softmax::softmax_rows(i[0], rows, cols, &mut o[0]).unwrap(),
            );
            check(
                &g,
                &format!("{what} in place"),
                &[],
                &[("x", x.clone())],
                |g, _, o| g.softmax_rows_in_place(&mut o[0], rows, cols).unwrap(),
                |_, o| sere_core::softmax::softmax_rows_in_place(&mut o[0], rows, cols).unwrap(),
            );
            check(
                &g,
                &format!("{what} log forward"),
                &[&x],
                &[("out", vec![0.0; n])],
                |g, i, o| g.log_softmax_rows(&i[0], rows, cols, &mut o[0]).unwrap(),
                |i, o| sere_core::softmax::log_softmax_rows(i[0], rows, cols, &mut o[0]).unwrap(),
            );
            let mut y = vec![0.0; n];
            sere_core::softmax::softmax_rows(&x, rows, cols, &mut y).unwrap();
            let mut l = vec![0.0; n];
            sere_core::softmax::log_softmax_rows(&x, rows, cols, &mut l).unwrap();
            let dy = rng.uniforms(n, -1.0, 1.0);
            check(
                &g,
                &format!("{what} backward"),
                &[&y, &dy],
                &[("dx", rng.uniforms(n, -1.0, 1.0))],
                |g, i, o| {
                    g.softmax_backward_rows(&i[0], &i[1], rows, cols, &mut o[0])
                        .unwrap()
                },
                |i, o| {
                    sere_core::softmax::softmax_backward_rows(i[0], i[1], rows, cols, &mut o[0])
                        .unwrap()
                },
            );
            check(
                &g,
                &format!("{what} log backward"),
                &[&l, &dy],
                &[("dx", rng.uniforms(n, -1.0, 1.0))],
                |g, i, o| {
                    g.log_softmax_backward_rows(&i[0], &i[1], rows, cols, &mut o[0])
                        .unwrap()
                },
                |i, o| {
                    sere_core::softmax::log_softmax_backward_rows(i[0], i[1], rows, cols, &mut o[0])
                        .unwrap()
                },
            );
        }
    }
}

#[test]
fn attention_softmax_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    // Attention rows: heads x tokens rows of `tokens` logits.
    for (rows, cols) in [(3 * 197, 197), (6 * 50, 50), (7, 1), (2, 1500)] {
        let scale = 1.0 / 64f32.sqrt();
        let what = format!("attention softmax {rows}x{cols}");
        let n = rows * cols;
        let s = rng.uniforms(n, -20.0, 20.0);
        let scaled: Vec<f32> = s.iter().map(|v| v * scale).collect();
        check(
            &g,
            &format!("{what} forward"),
            &[&s],
            &[("probs", vec![0.0; n])],
            |g, i, o| {
                g.attention_softmax_forward(&i[0], rows, cols, scale, &mut o[0])
                    .unwrap()
            },
            |_, o| sere_core::softmax::softmax_rows(&scaled, rows, cols, &mut o[0]).unwrap(),
        );
        check(
            &g,
            &format!("{what} in place"),
            &[],
            &[("logits", s.clone())],
            |g, _, o| {
                g.attention_softmax_in_place(&mut o[0], rows, cols, scale)
                    .unwrap()
            },
            |_, o| sere_core::softmax::softmax_rows(&scaled, rows, cols, &mut o[0]).unwrap(),
        );
        let mut p = vec![0.0; n];
        sere_core::softmax::softmax_rows(&scaled, rows, cols, &mut p).unwrap();
        let dp = rng.uniforms(n, -1.0, 1.0);
        check(
            &g,
            &format!("{what} backward"),
            &[&p, &dp],
            &[("dlogits", rng.uniforms(n, -1.0, 1.0))],
            |g, i, o| {
                g.attention_softmax_backward(&i[0], &i[1], rows, cols, scale, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                let mut t = vec![0.0; n];
                sere_core::softmax::softmax_backward_rows(i[0], i[1], rows, cols, &mut t).unwrap();
                for (d, v) in o[0].iter_mut().zip(t) {
                    *d += scale * v;
                }
            },
        );
    }
}

#[test]
fn relation_cross_entropy_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(6);
    for (rows, cols) in [(1, 3), (3 * 169, 169), (384, 384), (10, 4097), (2, 1)] {
        for (tau_s, tau_t) in [(1.0f32, 0.5f32), (1.0, 0.1)] {
            let what = format!("relation CE {rows}x{cols} tau_t={tau_t}");
            let n = rows * cols;
            let s = rng.uniforms(n, -3.0, 3.0);
            let t = rng.uniforms(n, -3.0, 3.0);
            check(
                &g,
                &format!("{what} loss"),
                &[&s, &t],
                &[("loss", vec![0.0])],
                |g, i, o| {
                    g.relation_cross_entropy(&i[0], &i[1], rows, cols, tau_s, tau_t, &mut o[0])
                        .unwrap()
                },
                |i, o| {
                    o[0][0] = sere_core::loss::relation_cross_entropy(
                        i[0], i[1], rows, cols, tau_s, tau_t,
                    )
                    .unwrap()
                },
            );
            let scale = 0.7;
            check(
                &g,
                &format!("{what} backward"),
                &[&s, &t],
                &[("grad", rng.uniforms(n, -1e-3, 1e-3)), ("loss", vec![0.0])],
                |g, i, o| {
                    let [gr, l] = o else { unreachable!() };
                    g.relation_cross_entropy_backward(
                        &i[0], &i[1], rows, cols, tau_s, tau_t, scale, gr, l,
                    )
                    .unwrap()
                },
                |i, o| {
                    let [gr, l] = o else { unreachable!() };
                    l[0] = sere_core::loss::relation_cross_entropy_backward(
                        i[0], i[1], rows, cols, tau_s, tau_t, scale, gr,
                    )
                    .unwrap()
                },
            );
        }
    }
}

#[test]
fn dino_loss_forward_backward_and_centre() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(7);
    for (sv, tv, batch, dim) in [(2, 2, 1, 7), (4, 2, 3, 65), (6, 2, 5, 1000), (3, 1, 2, 33)] {
        let shape = DinoShape {
            student_views: sv,
            teacher_views: tv,
            batch,
            dim,
        };
        let what = format!("DINO {sv}/{tv} views b={batch} K={dim}");
        let s = rng.uniforms(sv * batch * dim, -2.0, 2.0);
        let t = rng.uniforms(tv * batch * dim, -2.0, 2.0);
        let c = rng.uniforms(dim, -0.5, 0.5);
        let (tau_s, tau_t) = (0.1f32, 0.04f32);
        check(
            &g,
            &format!("{what} loss"),
            &[&s, &t, &c],
            &[("loss", vec![0.0])],
            |g, i, o| {
                g.dino_loss(&i[0], &i[1], &i[2], shape, tau_s, tau_t, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                o[0][0] = sere_core::loss::dino_loss(i[0], i[1], i[2], shape, tau_s, tau_t).unwrap()
            },
        );
        let scale = 1.3;
        check(
            &g,
            &format!("{what} backward"),
            &[&s, &t, &c],
            &[
                ("grad", rng.uniforms(sv * batch * dim, -1e-2, 1e-2)),
                ("loss", vec![0.0]),
            ],
            |g, i, o| {
                let [gr, l] = o else { unreachable!() };
                g.dino_loss_backward(&i[0], &i[1], &i[2], shape, tau_s, tau_t, scale, gr, l)
                    .unwrap()
            },
            |i, o| {
                let [gr, l] = o else { unreachable!() };
                l[0] = sere_core::loss::dino_loss_backward(
                    i[0], i[1], i[2], shape, tau_s, tau_t, scale, gr,
                )
                .unwrap()
            },
        );
        let rows = tv * batch;
        check(
            &g,
            &format!("{what} centre update"),
            &[&t],
            &[("centre", c.clone())],
            |g, i, o| {
                g.dino_centre_update(&i[0], rows, dim, 0.9, &mut o[0])
                    .unwrap()
            },
            |i, o| sere_core::loss::dino_centre_update(i[0], rows, dim, 0.9, &mut o[0]).unwrap(),
        );
    }
}

#[test]
fn row_dot_add_matches_a_plain_loop() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(23);
    for (rows, cols) in [(1, 1), (7, 5), (1024, 128), (3, 4097)] {
        let a = rng.uniforms(rows * cols, -1.0, 1.0);
        let b = rng.uniforms(rows * cols, -1.0, 1.0);
        let out0 = rng.uniforms(rows, -1.0, 1.0);
        check(
            &g,
            &format!("row dots {rows}x{cols}"),
            &[&a, &b],
            &[("out", out0)],
            |g, i, o| g.row_dot_add(&i[0], &i[1], rows, cols, &mut o[0]).unwrap(),
            |i, o| {
                for (r, v) in o[0].iter_mut().enumerate() {
                    let span = r * cols..(r + 1) * cols;
                    *v += i[0][span.clone()]
                        .iter()
                        .zip(&i[1][span])
                        .map(|(x, y)| x * y)
                        .sum::<f32>();
                }
            },
        );
    }
}

#[test]
fn teacher_entropy_matches_the_core() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(19);
    for (rows, dim, spread) in [(1, 7, 0.1), (6, 65, 2.0), (64, 1000, 0.5), (3, 4096, 4.0)] {
        let t = rng.uniforms(rows * dim, -spread, spread);
        let c = rng.uniforms(dim, -0.5, 0.5);
        let tau_t = 0.04f32;
        check(
            &g,
            &format!("teacher entropy {rows}x{dim}"),
            &[&t, &c],
            &[("entropy", vec![0.0])],
            |g, i, o| {
                g.teacher_entropy(&i[0], &i[1], rows, dim, tau_t, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                o[0][0] = sere_core::loss::teacher_entropy(i[0], i[1], rows, dim, tau_t).unwrap()
            },
        );
    }
}

#[test]
fn weighted_cross_entropy_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(17);
    for (images, patches, dim) in [(1, 4, 7), (4, 16, 65), (6, 49, 1000)] {
        let rows = images * patches;
        let what = format!("weighted CE {images}x{patches} K={dim}");
        let s = rng.uniforms(rows * dim, -2.0, 2.0);
        let t = rng.uniforms(rows * dim, -2.0, 2.0);
        let c = rng.uniforms(dim, -0.5, 0.5);
        // About a third of the rows masked, the first image not at all.
        let masks: Vec<bool> = (0..rows)
            .map(|r| r >= patches && rng.uniforms(1, 0.0, 1.0)[0] < 0.35)
            .collect();
        let mut w = vec![0.0f32; rows];
        sere_core::loss::masked_patch_weights(&masks, patches, &mut w).unwrap();
        let (tau_s, tau_t) = (0.1f32, 0.04f32);
        let args = |i: &[&[f32]]| (i[0].len() / dim, dim);
        check(
            &g,
            &format!("{what} loss"),
            &[&s, &t, &c, &w],
            &[("loss", vec![0.0])],
            |g, i, o| {
                g.weighted_cross_entropy(
                    &i[0], &i[1], &i[2], &i[3], rows, dim, tau_s, tau_t, &mut o[0],
                )
                .unwrap()
            },
            |i, o| {
                let (r, d) = args(i);
                o[0][0] = sere_core::loss::weighted_cross_entropy(
                    i[0], i[1], i[2], i[3], r, d, tau_s, tau_t, None,
                )
                .unwrap()
            },
        );
        let scale = 1.3;
        check(
            &g,
            &format!("{what} backward"),
            &[&s, &t, &c, &w],
            &[
                ("grad", rng.uniforms(rows * dim, -1e-2, 1e-2)),
                ("loss", vec![0.0]),
            ],
            |g, i, o| {
                let [gr, l] = o else { unreachable!() };
                g.weighted_cross_entropy_backward(
                    &i[0], &i[1], &i[2], &i[3], rows, dim, tau_s, tau_t, scale, gr, l,
                )
                .unwrap()
            },
            |i, o| {
                let (r, d) = args(i);
                let [gr, l] = o else { unreachable!() };
                l[0] = sere_core::loss::weighted_cross_entropy(
                    i[0],
                    i[1],
                    i[2],
                    i[3],
                    r,
                    d,
                    tau_s,
                    tau_t,
                    Some((gr, scale)),
                )
                .unwrap()
            },
        );
    }
}

#[test]
fn layer_norm_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(8);
    for (rows, cols) in [(1, 1), (3, 7), (197, 192), (5, 1000), (2, 3000), (33, 384)] {
        let what = format!("layer_norm {rows}x{cols}");
        let n = rows * cols;
        let eps = 1e-6;
        let x = rng.uniforms(n, -2.0, 3.0);
        let gamma = rng.uniforms(cols, 0.5, 1.5);
        let beta = rng.uniforms(cols, -0.5, 0.5);
        check(
            &g,
            &format!("{what} forward"),
            &[&x, &gamma, &beta],
            &[
                ("out", vec![0.0; n]),
                ("mean", vec![0.0; rows]),
                ("rstd", vec![0.0; rows]),
            ],
            |g, i, o| {
                let [y, m, r] = o else { unreachable!() };
                g.layer_norm_forward(&i[0], &i[1], &i[2], rows, cols, eps, y, m, r)
                    .unwrap()
            },
            |i, o| {
                let [y, m, r] = o else { unreachable!() };
                sere_core::norm::layer_norm_forward(i[0], i[1], i[2], rows, cols, eps, y, m, r)
                    .unwrap()
            },
        );
        let (mut y, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
        sere_core::norm::layer_norm_forward(
            &x, &gamma, &beta, rows, cols, eps, &mut y, &mut mean, &mut rstd,
        )
        .unwrap();
        let dy = rng.uniforms(n, -1.0, 1.0);
        check(
            &g,
            &format!("{what} backward"),
            &[&x, &gamma, &mean, &rstd, &dy],
            &[
                ("dx", rng.uniforms(n, -1.0, 1.0)),
                ("dgamma", rng.uniforms(cols, -1.0, 1.0)),
                ("dbeta", rng.uniforms(cols, -1.0, 1.0)),
            ],
            |g, i, o| {
                let [dx, dg, db] = o else { unreachable!() };
                g.layer_norm_backward(&i[0], &i[1], &i[2], &i[3], &i[4], rows, cols, dx, dg, db)
                    .unwrap()
            },
            |i, o| {
                let [dx, dg, db] = o else { unreachable!() };
                sere_core::norm::layer_norm_backward(
                    i[0], i[1], i[2], i[3], i[4], rows, cols, dx, dg, db,
                )
                .unwrap()
            },
        );
    }
}

#[test]
fn batch_norm_train_eval_running_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(9);
    for (rows, cols) in [(2, 3), (197, 33), (1000, 70), (384, 384), (1, 5)] {
        let what = format!("batch_norm {rows}x{cols}");
        let n = rows * cols;
        let eps = 1e-5;
        let x = rng.uniforms(n, -2.0, 3.0);
        let gamma = rng.uniforms(cols, 0.5, 1.5);
        let beta = rng.uniforms(cols, -0.5, 0.5);
        check(
            &g,
            &format!("{what} stats"),
            &[&x],
            &[("mean", vec![0.0; cols]), ("var", vec![0.0; cols])],
            |g, i, o| {
                let [m, v] = o else { unreachable!() };
                g.batch_norm_stats(&i[0], rows, cols, m, v).unwrap()
            },
            |i, o| {
                let [m, v] = o else { unreachable!() };
                sere_core::norm::batch_norm_stats(i[0], rows, cols, m, v).unwrap()
            },
        );
        check(
            &g,
            &format!("{what} forward"),
            &[&x, &gamma, &beta],
            &[
                ("out", vec![0.0; n]),
                ("mean", vec![0.0; cols]),
                ("var", vec![0.0; cols]),
                ("rstd", vec![0.0; cols]),
            ],
            |g, i, o| {
                let [y, m, v, r] = o else { unreachable!() };
                g.batch_norm_forward(&i[0], &i[1], &i[2], rows, cols, eps, y, m, v, r)
                    .unwrap()
            },
            |i, o| {
                let [y, m, v, r] = o else { unreachable!() };
                sere_core::norm::batch_norm_forward(i[0], i[1], i[2], rows, cols, eps, y, m, v, r)
                    .unwrap()
            },
        );
        let rm = rng.uniforms(cols, -0.5, 0.5);
        let rv = rng.uniforms(cols, 0.5, 2.0);
        check(
            &g,
            &format!("{what} eval"),
            &[&x, &gamma, &beta, &rm, &rv],
            &[("out", vec![0.0; n])],
            |g, i, o| {
                g.batch_norm_eval(
                    &i[0], &i[1], &i[2], &i[3], &i[4], rows, cols, eps, &mut o[0],
                )
                .unwrap()
            },
            |i, o| {
                sere_core::norm::batch_norm_eval(
                    i[0], i[1], i[2], i[3], i[4], rows, cols, eps, &mut o[0],
                )
                .unwrap()
            },
        );
        let (mut y, mut mean, mut var, mut rstd) = (
            vec![0.0; n],
            vec![0.0; cols],
            vec![0.0; cols],
            vec![0.0; cols],
        );
        sere_core::norm::batch_norm_forward(
            &x, &gamma, &beta, rows, cols, eps, &mut y, &mut mean, &mut var, &mut rstd,
        )
        .unwrap();
        check(
            &g,
            &format!("{what} running update"),
            &[&mean, &var],
            &[("running_mean", rm.clone()), ("running_var", rv.clone())],
            |g, i, o| {
                let [m, v] = o else { unreachable!() };
                g.batch_norm_update_running(&i[0], &i[1], rows, 0.1, m, v)
                    .unwrap()
            },
            |i, o| {
                let [m, v] = o else { unreachable!() };
                sere_core::norm::batch_norm_update_running(i[0], i[1], rows, 0.1, m, v).unwrap()
            },
        );
        let dy = rng.uniforms(n, -1.0, 1.0);
        check(
            &g,
            &format!("{what} backward"),
            &[&x, &gamma, &mean, &rstd, &dy],
            &[
                ("dx", rng.uniforms(n, -1.0, 1.0)),
                ("dgamma", rng.uniforms(cols, -1.0, 1.0)),
                ("dbeta", rng.uniforms(cols, -1.0, 1.0)),
            ],
            |g, i, o| {
                let [dx, dg, db] = o else { unreachable!() };
                g.batch_norm_backward(&i[0], &i[1], &i[2], &i[3], &i[4], rows, cols, dx, dg, db)
                    .unwrap()
            },
            |i, o| {
                let [dx, dg, db] = o else { unreachable!() };
                let mut scratch = vec![0.0; 2 * cols];
                sere_core::norm::batch_norm_backward(
                    i[0],
                    i[1],
                    i[2],
                    i[3],
                    i[4],
                    rows,
                    cols,
                    dx,
                    dg,
                    db,
                    &mut scratch,
                )
                .unwrap()
            },
        );
    }
}

#[test]
fn gelu_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(10);
    for n in [1usize, 1000, 100_003] {
        let x = rng.uniforms(n, -6.0, 6.0);
        let dy = rng.uniforms(n, -1.0, 1.0);
        check(
            &g,
            &format!("gelu n={n} forward"),
            &[&x],
            &[("out", vec![0.0; n])],
            |g, i, o| g.gelu_forward(&i[0], &mut o[0]).unwrap(),
            |i, o| sere_core::activation::gelu_forward(i[0], &mut o[0]).unwrap(),
        );
        check(
            &g,
            &format!("gelu n={n} backward"),
            &[&x, &dy],
            &[("dx", rng.uniforms(n, -1.0, 1.0))],
            |g, i, o| g.gelu_backward(&i[0], &i[1], &mut o[0]).unwrap(),
            |i, o| sere_core::activation::gelu_backward(i[0], i[1], &mut o[0]).unwrap(),
        );
    }
}

#[test]
fn linear_layer_and_bias_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    for (rows, inp, out) in [(1, 1, 1), (7, 13, 5), (197, 192, 576), (33, 384, 100)] {
        let what = format!("linear {rows}x{inp}->{out}");
        let x = rng.uniforms(rows * inp, -1.0, 1.0);
        let w = rng.uniforms(out * inp, -0.2, 0.2);
        let b = rng.uniforms(out, -0.5, 0.5);
        let dy = rng.uniforms(rows * out, -1.0, 1.0);
        check(
            &g,
            &format!("{what} forward + bias"),
            &[&x, &w, &b],
            &[("y", vec![0.0; rows * out])],
            |g, i, o| {
                g.linear_forward(&i[0], &i[1], rows, inp, out, &mut o[0])
                    .unwrap();
                g.bias_add(&mut o[0], &i[2], rows, out).unwrap();
            },
            |i, o| {
                sere_core::linalg::linear_forward(i[0], i[1], Some(i[2]), rows, inp, out, &mut o[0])
                    .unwrap()
            },
        );
        check(
            &g,
            &format!("{what} backward"),
            &[&x, &w, &dy],
            &[
                ("dx", rng.uniforms(rows * inp, -1.0, 1.0)),
                ("dweight", rng.uniforms(out * inp, -1.0, 1.0)),
                ("dbias", rng.uniforms(out, -1.0, 1.0)),
            ],
            |g, i, o| {
                let [dx, dw, db] = o else { unreachable!() };
                g.linear_backward_input(&i[2], &i[1], rows, inp, out, dx)
                    .unwrap();
                g.linear_backward_weight(&i[0], &i[2], rows, inp, out, dw)
                    .unwrap();
                g.bias_grad(&i[2], rows, out, db).unwrap();
            },
            |i, o| {
                let [dx, dw, db] = o else { unreachable!() };
                sere_core::linalg::linear_backward(
                    i[0],
                    i[1],
                    i[2],
                    rows,
                    inp,
                    out,
                    Some(dx),
                    Some(dw),
                    Some(db),
                )
                .unwrap()
            },
        );
    }
}

#[test]
fn gemm_all_transposes_batched_with_beta() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(12);
    let (m, n, k, batch) = (3usize, 5usize, 7usize, 2usize);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = rng.uniforms(batch * m * k, -1.0, 1.0);
        let b = rng.uniforms(batch * k * n, -1.0, 1.0);
        let c0 = rng.uniforms(batch * m * n, -1.0, 1.0);
        // Stored shapes: A is m x k (or k x m when used transposed).
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let mut av = MatView::row_major(ar, ac);
        let mut bv = MatView::row_major(br, bc);
        if ta {
            av = av.t();
        }
        if tb {
            bv = bv.t();
        }
        check(
            &g,
            &format!("gemm ta={ta} tb={tb}"),
            &[&a, &b],
            &[("C", c0.clone())],
            |g, i, o| {
                g.gemm(
                    batch,
                    0.75,
                    &i[0],
                    av,
                    &i[1],
                    bv,
                    0.5,
                    &mut o[0],
                    MatView::row_major(m, n),
                )
                .unwrap()
            },
            |i, o| {
                for bi in 0..batch {
                    let mut am = MatRef::row_major(ar, ac).at(bi * m * k);
                    let mut bm = MatRef::row_major(br, bc).at(bi * k * n);
                    if ta {
                        am = am.transposed();
                    }
                    if tb {
                        bm = bm.transposed();
                    }
                    sere_core::linalg::gemm(
                        0.75,
                        i[0],
                        am,
                        i[1],
                        bm,
                        0.5,
                        &mut o[0],
                        MatRef::row_major(m, n).at(bi * m * n),
                    )
                    .unwrap();
                }
            },
        );
    }
}

#[test]
fn adamw_ema_and_scaling() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(13);
    let opt = AdamW {
        lr: 1e-3,
        weight_decay: 0.04,
        ..AdamW::default()
    };
    for n in [1usize, 1001, 300_007] {
        let p = rng.uniforms(n, -1.0, 1.0);
        let m = rng.uniforms(n, -0.1, 0.1);
        let v = rng.uniforms(n, 0.0, 0.01);
        let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.uniforms(n, -1.0, 1.0)).collect();
        check(
            &g,
            &format!("adamw n={n} steps 1..=3"),
            &[&grads[0], &grads[1], &grads[2]],
            &[("params", p.clone()), ("m", m.clone()), ("v", v.clone())],
            |g, i, o| {
                let [p, m, v] = o else { unreachable!() };
                for (t, gr) in i.iter().enumerate() {
                    g.adamw_step(p, gr, m, v, &opt, t as u32 + 1).unwrap();
                }
            },
            |i, o| {
                let [p, m, v] = o else { unreachable!() };
                for (t, gr) in i.iter().enumerate() {
                    sere_core::optim::adamw_step(p, gr, m, v, &opt, t as u32 + 1).unwrap();
                }
            },
        );
        check(
            &g,
            &format!("adamw scaled n={n} step 7"),
            &[&grads[0], &[0.3]],
            &[("params", p.clone()), ("m", m.clone()), ("v", v.clone())],
            |g, i, o| {
                let [p, m, v] = o else { unreachable!() };
                g.adamw_step_scaled(p, &i[0], m, v, &opt, 7, &i[1]).unwrap();
            },
            |i, o| {
                let [p, m, v] = o else { unreachable!() };
                let scaled: Vec<f32> = i[0].iter().map(|x| x * 0.3).collect();
                sere_core::optim::adamw_step(p, &scaled, m, v, &opt, 7).unwrap();
            },
        );
        let s = rng.uniforms(n, -1.0, 1.0);
        check(
            &g,
            &format!("ema n={n}"),
            &[&s],
            &[("teacher", p.clone())],
            |g, i, o| g.ema_update(&mut o[0], &i[0], 0.996).unwrap(),
            |i, o| sere_core::optim::ema_update(&mut o[0], i[0], 0.996).unwrap(),
        );
        check(
            &g,
            &format!("scale/axpy n={n}"),
            &[&s, &[2.5]],
            &[("y", p.clone())],
            |g, i, o| {
                g.scale(&mut o[0], 0.5).unwrap();
                g.axpy(&mut o[0], &i[0], -0.25).unwrap();
                g.scale_by(&mut o[0], &i[1]).unwrap();
            },
            |i, o| {
                for (y, x) in o[0].iter_mut().zip(i[0]) {
                    *y = (*y * 0.5 + -0.25 * x) * 2.5;
                }
            },
        );
    }
}

#[test]
fn l2_norm_and_gradient_clipping() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(14);
    for n in [5usize, 1000, 100_003] {
        for max_norm in [0.1f32, 1e6] {
            let x = rng.uniforms(n, -1.0, 1.0);
            check(
                &g,
                &format!("l2_norm n={n}"),
                &[&x],
                &[("norm", vec![0.0])],
                |g, i, o| g.l2_norm(&i[0], &mut o[0]).unwrap(),
                |i, o| o[0][0] = sere_core::optim::l2_norm(i[0]),
            );
            check(
                &g,
                &format!("clip_grad_norm n={n} max={max_norm}"),
                &[],
                &[("grads", x.clone()), ("norm", vec![0.0])],
                |g, _, o| {
                    let [gr, nm] = o else { unreachable!() };
                    g.clip_grad_norm(gr, max_norm, nm).unwrap()
                },
                |_, o| {
                    let [gr, nm] = o else { unreachable!() };
                    nm[0] = sere_core::optim::clip_grad_norm(gr, max_norm).unwrap()
                },
            );
            check(
                &g,
                &format!("grad_clip_factor n={n} max={max_norm}"),
                &[&x],
                &[("norm", vec![0.0]), ("factor", vec![0.0])],
                |g, i, o| {
                    let [nm, f] = o else { unreachable!() };
                    g.grad_clip_factor(&i[0], max_norm, nm, f).unwrap()
                },
                |i, o| {
                    let [nm, f] = o else { unreachable!() };
                    let norm = sere_core::optim::l2_norm(i[0]);
                    let c = max_norm / (norm + 1e-6);
                    nm[0] = norm;
                    f[0] = if c < 1.0 { c } else { 1.0 };
                },
            );
        }
    }
}

#[test]
fn shape_errors_are_reported_not_panics() {
    let Some(g) = gpu() else { return };
    let x = g.upload(&[1.0, 2.0, 3.0]).unwrap();
    let mut y = g.zeros(2).unwrap();
    let e = g.softmax_rows(&x, 1, 3, &mut y).unwrap_err();
    assert!(e.to_string().contains("out"), "{e}");
    let mut l = g.zeros(4).unwrap();
    assert!(g.spatial_relation_forward(&x, 1, 1, 3, 2, &mut l).is_err());
}

// ---- the training step's kernels (kernels/train.cu, indexed sampling) ----
// References: the host trainer's inline CPU code (sere-host's ViT and DINO
// head), restated here (sere-host depends on this crate), and sere-core's
// grid sampling per slot.

#[test]
fn im2col_copy_rows_keep_and_relu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(21);
    for (b, ch, img, p) in [
        (2usize, 3usize, 8usize, 4usize),
        (3, 3, 20, 5),
        (1, 1, 16, 16),
    ] {
        let x = rng.uniforms(b * ch * img * img, -1.0, 1.0);
        let n = x.len();
        check(
            &g,
            &format!("im2col b={b} c={ch} s={img} p={p}"),
            &[&x],
            &[("patches", vec![0.0; n])],
            |g, i, o| g.im2col(&i[0], b, ch, img, p, &mut o[0]).unwrap(),
            |i, o| {
                let gs = img / p;
                let row = ch * p * p;
                for bi in 0..b {
                    for py in 0..gs {
                        for px in 0..gs {
                            for c in 0..ch {
                                for ky in 0..p {
                                    for kx in 0..p {
                                        let r = (bi * gs + py) * gs + px;
                                        o[0][r * row + (c * p + ky) * p + kx] =
                                            i[0][((bi * ch + c) * img + py * p + ky) * img
                                                + px * p
                                                + kx];
                                    }
                                }
                            }
                        }
                    }
                }
            },
        );
    }
    for (rows, cols, ss, ds) in [
        (5usize, 7usize, 9usize, 8usize),
        (33, 300, 301, 300),
        (1, 1, 1, 1),
    ] {
        let src = rng.uniforms((rows - 1) * ss + cols, -1.0, 1.0);
        for acc in [false, true] {
            check(
                &g,
                &format!("copy_rows {rows}x{cols} strides {ss}/{ds} accumulate={acc}"),
                &[&src],
                &[("dst", rng.uniforms((rows - 1) * ds + cols, -1.0, 1.0))],
                |g, i, o| {
                    g.copy_rows(&i[0], ss, &mut o[0], ds, rows, cols, acc)
                        .unwrap()
                },
                |i, o| {
                    for r in 0..rows {
                        for j in 0..cols {
                            let v = i[0][r * ss + j];
                            let d = &mut o[0][r * ds + j];
                            *d = if acc { *d + v } else { v };
                        }
                    }
                },
            );
        }
    }
    for (imgs, per) in [(3usize, 5usize), (7, 1000), (1, 1)] {
        let n = imgs * per;
        let x = rng.uniforms(n, -1.0, 1.0);
        let keep: Vec<f32> = (0..imgs).map(|i| [0.0, 1.0, 1.0 / 0.9][i % 3]).collect();
        check(
            &g,
            &format!("residual_keep_add {imgs}x{per}"),
            &[&x, &keep],
            &[("out", rng.uniforms(n, -1.0, 1.0))],
            |g, i, o| g.residual_keep_add(&mut o[0], &i[0], &i[1], per).unwrap(),
            |i, o| {
                for (k, v) in o[0].iter_mut().enumerate() {
                    *v = i[0][k] + i[1][k / per] * *v;
                }
            },
        );
        check(
            &g,
            &format!("keep_scale {imgs}x{per}"),
            &[&x, &keep],
            &[("out", rng.uniforms(n, -1.0, 1.0))],
            |g, i, o| g.keep_scale(&i[0], &i[1], per, &mut o[0]).unwrap(),
            |i, o| {
                for (k, v) in o[0].iter_mut().enumerate() {
                    *v = i[1][k / per] * i[0][k];
                }
            },
        );
        check(
            &g,
            &format!("relu {n}"),
            &[],
            &[("x", x.clone())],
            |g, _, o| g.relu_in_place(&mut o[0]).unwrap(),
            |_, o| o[0].iter_mut().for_each(|v| *v = v.max(0.0)),
        );
        let dy = rng.uniforms(n, -1.0, 1.0);
        check(
            &g,
            &format!("relu backward {n}"),
            &[&x, &dy],
            &[("dx", rng.uniforms(n, -1.0, 1.0))],
            |g, i, o| g.relu_backward(&i[0], &i[1], &mut o[0]).unwrap(),
            |i, o| {
                for (k, v) in o[0].iter_mut().enumerate() {
                    *v = if i[0][k] > 0.0 { i[1][k] } else { 0.0 };
                }
            },
        );
    }
}

#[test]
fn l2_normalize_rows_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(22);
    for (rows, cols, eps) in [(5usize, 7usize, 1e-12f32), (64, 256, 0.0), (3, 1000, 1e-12)] {
        let mut x = rng.uniforms(rows * cols, -1.0, 1.0);
        // One row with a tiny norm: the clamp and its backward branch.
        x[..cols].iter_mut().for_each(|v| *v *= 1e-14);
        let reference = |x: &[f32]| -> (Vec<f32>, Vec<f32>) {
            let mut u = vec![0.0; rows * cols];
            let mut nr = vec![0.0; rows];
            for r in 0..rows {
                let s = &x[r * cols..(r + 1) * cols];
                let ss: f32 = s.iter().map(|v| v * v).sum();
                nr[r] = ss.sqrt().max(eps);
                for j in 0..cols {
                    u[r * cols + j] = s[j] * (1.0 / nr[r]);
                }
            }
            (u, nr)
        };
        let (u, nr) = reference(&x);
        check(
            &g,
            &format!("l2_normalize_rows {rows}x{cols} eps={eps}"),
            &[&x],
            &[("dst", vec![0.0; rows * cols]), ("norms", vec![0.0; rows])],
            |g, i, o| {
                let [d, n] = o else { unreachable!() };
                g.l2_normalize_rows(&i[0], rows, cols, eps, d, n).unwrap()
            },
            |_, o| {
                o[0].copy_from_slice(&u);
                o[1].copy_from_slice(&nr);
            },
        );
        let du = rng.uniforms(rows * cols, -1.0, 1.0);
        for acc in [false, true] {
            check(
                &g,
                &format!("l2_normalize_rows backward {rows}x{cols} eps={eps} accumulate={acc}"),
                &[&du, &u, &nr],
                &[("dst", rng.uniforms(rows * cols, -1.0, 1.0))],
                |g, i, o| {
                    g.l2_normalize_rows_backward(
                        &i[0], &i[1], &i[2], rows, cols, eps, acc, &mut o[0],
                    )
                    .unwrap()
                },
                |i, o| {
                    for r in 0..rows {
                        let (dur, ur) = (
                            &i[0][r * cols..(r + 1) * cols],
                            &i[1][r * cols..(r + 1) * cols],
                        );
                        let n = i[2][r];
                        let dot: f32 = if n > eps {
                            dur.iter().zip(ur).map(|(a, b)| a * b).sum()
                        } else {
                            0.0
                        };
                        for j in 0..cols {
                            let v = (dur[j] - ur[j] * dot) * (1.0 / n);
                            let d = &mut o[0][r * cols + j];
                            *d = if acc { *d + v } else { v };
                        }
                    }
                },
            );
        }
    }
}

#[test]
fn indexed_grid_sample_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(23);
    for (nmaps, c, h, w, p, index) in [
        (4usize, 3usize, 5usize, 7usize, 11usize, vec![2i32, 0, 3]),
        (8, 64, 14, 14, 169, vec![7, 1, 1, 4, 0]),
        (2, 33, 6, 6, 36, vec![1]),
    ] {
        let slots = index.len();
        let shape = SampleShape {
            channels: c,
            height: h,
            width: w,
            points: p,
        };
        let map_len = h * w * c;
        let maps = rng.uniforms(nmaps * map_len, -1.0, 1.0);
        let grids = rng.uniforms(slots * 2 * p, -1.2, 1.2);
        let gout = rng.uniforms(slots * p * c, -1.0, 1.0);
        let what = format!("indexed grid_sample {nmaps} maps {h}x{w}x{c} P={p} slots={slots}");
        let idx = g.stream().clone_htod(&index).unwrap();
        check(
            &g,
            &format!("{what} forward"),
            &[&maps, &grids],
            &[("out", vec![0.0; slots * p * c])],
            |g, i, o| {
                g.grid_sample_forward_indexed(&i[0], nmaps, &idx, &i[1], slots, shape, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                for (s, &m) in index.iter().enumerate() {
                    let m = m as usize;
                    sere_core::bilinear::grid_sample_forward(
                        &i[0][m * map_len..(m + 1) * map_len],
                        &i[1][s * 2 * p..(s + 1) * 2 * p],
                        shape,
                        MapLayout::Hwc,
                        &mut o[0][s * p * c..(s + 1) * p * c],
                    )
                    .unwrap();
                }
            },
        );
        check(
            &g,
            &format!("{what} backward"),
            &[&maps, &grids, &gout],
            &[("grad_maps", rng.uniforms(nmaps * map_len, -1.0, 1.0))],
            |g, i, o| {
                g.grid_sample_backward_indexed(&idx, &i[1], &i[2], slots, shape, nmaps, &mut o[0])
                    .unwrap()
            },
            |i, o| {
                for (s, &m) in index.iter().enumerate() {
                    let m = m as usize;
                    sere_core::bilinear::grid_sample_backward(
                        &i[0][m * map_len..(m + 1) * map_len],
                        &i[1][s * 2 * p..(s + 1) * 2 * p],
                        &i[2][s * p * c..(s + 1) * p * c],
                        shape,
                        MapLayout::Hwc,
                        &mut o[0][m * map_len..(m + 1) * map_len],
                        None,
                    )
                    .unwrap();
                }
            },
        );
    }
}

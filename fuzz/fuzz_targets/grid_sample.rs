//! Bilinear `grid_sample` forward and backward, both layouts, on small
//! arbitrary shapes (C <= 8, H, W <= 12, P <= 16, zeros included), arbitrary
//! values and slice lengths that sometimes do not match the shape.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sere_core::bilinear::{grid_sample_backward, grid_sample_forward, MapLayout, SampleShape};
use sere_fuzz::{bounded, dim, fill, finite, Len, Num};

#[derive(Arbitrary, Debug)]
struct Input {
    c: u8,
    h: u8,
    w: u8,
    p: u8,
    hwc: bool,
    with_grad_grid: bool,
    len_map: Len,
    len_grid: Len,
    len_out: Len,
    len_grad_out: Len,
    len_grad_map: Len,
    len_grad_grid: Len,
    map: Vec<Num>,
    grid: Vec<Num>,
    grad_out: Vec<Num>,
    grad_init: Vec<Num>,
}

/// Bound under which every result must be finite.
const B: f32 = 1e6;

fuzz_target!(|inp: Input| {
    let shape = SampleShape {
        channels: dim(inp.c, 8),
        height: dim(inp.h, 12),
        width: dim(inp.w, 12),
        points: dim(inp.p, 16),
    };
    let layout = if inp.hwc { MapLayout::Hwc } else { MapLayout::Chw };
    let (map_need, grid_need, out_need) = (shape.map_len(), 2 * shape.points, shape.out_len());
    let dims_ok = shape.channels > 0 && shape.height > 0 && shape.width > 0 && shape.points > 0;

    let map = fill(&inp.map, inp.len_map.get(map_need));
    let grid = fill(&inp.grid, inp.len_grid.get(grid_need));
    let grid_finite = finite(&grid);
    let shapes_ok = dims_ok && map.len() == map_need && grid.len() == grid_need;

    // Forward.
    let mut out = vec![f32::NAN; inp.len_out.get(out_need)];
    let res = grid_sample_forward(&map, &grid, shape, layout, &mut out);
    let expect_ok = shapes_ok && out.len() == out_need && grid_finite;
    assert_eq!(res.is_ok(), expect_ok, "forward: {res:?}");
    if res.is_ok() {
        // Every output is written (the NaN fill is gone) ...
        assert!(out.iter().all(|v| !v.is_nan()) || !finite(&map), "forward left NaN");
        // ... and with bounded finite inputs it is finite.
        if bounded(&map, B) && bounded(&grid, B) {
            assert!(finite(&out), "non-finite forward output {out:?}");
        }
    }

    // Backward.
    let grad_out = fill(&inp.grad_out, inp.len_grad_out.get(out_need));
    let mut grad_map = fill(&inp.grad_init, inp.len_grad_map.get(map.len()));
    let grad_map_init_bounded = bounded(&grad_map, B);
    let grad_grid_init = fill(&inp.grad_init, inp.len_grad_grid.get(grid.len()));
    let mut grad_grid = grad_grid_init.clone();
    let res = grid_sample_backward(
        &map,
        &grid,
        &grad_out,
        shape,
        layout,
        &mut grad_map,
        if inp.with_grad_grid { Some(&mut grad_grid) } else { None },
    );
    let expect_ok = shapes_ok
        && grad_out.len() == out_need
        && grad_map.len() == map.len()
        && (!inp.with_grad_grid || grad_grid.len() == grid.len())
        && grid_finite;
    assert_eq!(res.is_ok(), expect_ok, "backward: {res:?}");
    if !inp.with_grad_grid {
        assert_eq!(
            grad_grid.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            grad_grid_init.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "grad_grid touched although not passed"
        );
    }
    if res.is_ok()
        && bounded(&map, B)
        && bounded(&grid, B)
        && bounded(&grad_out, B)
        && grad_map_init_bounded
        && bounded(&grad_grid_init, B)
    {
        assert!(finite(&grad_map), "non-finite grad_map {grad_map:?}");
        assert!(finite(&grad_grid), "non-finite grad_grid {grad_grid:?}");
    }
});

//! Crop geometry: `CropBox::new`/`validate`, `overlap`, `overlap_grids`
//! (both placements) and the normalized-coordinate maps, on arbitrary f32
//! crops (NaN, infinities, huge, negative, subnormal) and grid sizes 0..=32.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sere_core::geometry::{overlap, overlap_grids, CropBox, GridPlacement, Rect};
use sere_fuzz::{dim, Len, Num};

#[derive(Arbitrary, Debug)]
struct Crop {
    x: Num,
    y: Num,
    w: Num,
    h: Num,
    flipped: bool,
}

impl Crop {
    fn get(&self) -> CropBox {
        CropBox {
            x: self.x.get(),
            y: self.y.get(),
            w: self.w.get(),
            h: self.h.get(),
            flipped: self.flipped,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    a: Crop,
    b: Crop,
    hs: u8,
    ws: u8,
    edge_to_edge: bool,
    len_a: Len,
    len_b: Len,
    points: Vec<(Num, Num)>,
}

fn inside(r: &Rect, c: &Rect) -> bool {
    r.x0 < r.x1 && r.y0 < r.y1 && r.x0 >= c.x0 && r.x1 <= c.x1 && r.y0 >= c.y0 && r.y1 <= c.y1
}

fn is_valid(c: &CropBox) -> bool {
    c.x.is_finite() && c.y.is_finite() && c.w.is_finite() && c.h.is_finite() && c.w > 0.0 && c.h > 0.0
}

fuzz_target!(|inp: Input| {
    let (a, b) = (inp.a.get(), inp.b.get());

    // new/validate agree with each other, never panic, and reject every
    // non-finite or non-positive-size record.
    for c in [&a, &b] {
        let v = c.validate();
        let n = CropBox::new(c.x, c.y, c.w, c.h, c.flipped);
        assert_eq!(v.is_ok(), n.is_ok());
        if let Ok(n) = n {
            assert_eq!(n, *c);
        }
        if !is_valid(c) {
            assert!(v.is_err(), "validate accepted {c:?}");
        }
    }

    // overlap on unvalidated records: never panics; any rect returned is
    // non-empty and inside both crops.
    let ov = overlap(&a, &b);
    if let Some(r) = ov {
        assert!(inside(&r, &a.rect()), "{r:?} not inside a = {a:?}");
        assert!(inside(&r, &b.rect()), "{r:?} not inside b = {b:?}");
        assert_eq!(overlap(&b, &a), Some(r), "overlap not symmetric");
    }

    // overlap_grids.
    let (hs, ws) = (dim(inp.hs, 32), dim(inp.ws, 32));
    let placement = if inp.edge_to_edge {
        GridPlacement::EdgeToEdge
    } else {
        GridPlacement::CellCentres
    };
    let need = hs * ws * 2;
    let (la, lb) = (inp.len_a.get(need), inp.len_b.get(need));
    const SENTINEL: f32 = -12345.0;
    let mut ga = vec![SENTINEL; la];
    let mut gb = vec![SENTINEL; lb];
    let res = overlap_grids(&a, &b, hs, ws, placement, &mut ga, &mut gb);
    let args_ok = a.validate().is_ok() && b.validate().is_ok() && hs > 0 && ws > 0 && la == need && lb == need;
    assert_eq!(res.is_ok(), args_ok, "{res:?}");
    match res {
        Ok(Some(r)) => {
            assert_eq!(Some(r), ov);
            assert!(inside(&r, &a.rect()) && inside(&r, &b.rect()), "{r:?}");
            // Validated crops have finite values: so must the grids.
            assert!(ga.iter().chain(&gb).all(|v| v.is_finite()), "non-finite grid {ga:?} {gb:?} for {a:?} {b:?}");
        }
        Ok(None) => {
            assert_eq!(ov, None);
            assert!(ga.iter().chain(&gb).all(|&v| v == SENTINEL), "grid touched without overlap");
        }
        Err(_) => {}
    }

    // to_normalized / from_normalized: never panic; on moderate values they
    // are inverse maps.
    for &(px, py) in inp.points.iter().take(16) {
        let (px, py) = (px.get(), py.get());
        for c in [&a, &b] {
            let (u, v) = c.to_normalized(px, py);
            let (x, y) = c.from_normalized(u, v);
            let (_, _) = c.from_normalized(px, py);
            let moderate = |p: f32, o: f32, s: f32| {
                p.is_finite() && o.is_finite() && p.abs() <= 1e6 && o.abs() <= 1e6 && (1e-3..=1e6).contains(&s)
            };
            if moderate(px, c.x, c.w) {
                let tol = 1e-5 * (px.abs() + c.x.abs() + c.w) + 1e-6;
                assert!((x - px).abs() <= tol, "x roundtrip {px} -> {u} -> {x} for {c:?}");
            }
            if moderate(py, c.y, c.h) {
                let tol = 1e-5 * (py.abs() + c.y.abs() + c.h) + 1e-6;
                assert!((y - py).abs() <= tol, "y roundtrip {py} -> {v} -> {y} for {c:?}");
            }
        }
    }
});

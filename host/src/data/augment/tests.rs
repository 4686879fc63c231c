//! Checks that each view's pixels are the recorded crop of the source.

use super::*;
use crate::data::rng::{stream, Purpose};

/// A horizontal/vertical ramp: red = x, green = y, blue = 7.
fn ramp(w: usize, h: usize) -> Raster {
    let data = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 7]))
        .collect();
    Raster::new(w, h, 3, data).unwrap()
}

/// Tolerance in source pixels: a triangle filter widened to a non-integer
/// footprint (shrinking, as PIL) reproduces a ramp only to about 0.03 px;
/// a half-pixel or flip error would be off by 0.5 or more.
const TOL: f32 = 0.1;

/// Geometry only: no photometric change, output in raw 0..255 units.
fn geometry_only(global: usize, local: usize, n_local: usize) -> MultiCrop {
    MultiCrop {
        jitter_p: 0.0,
        grayscale_p: 0.0,
        blur_p: [0.0; 3],
        solarize_p: 0.0,
        mean: [0.0; 3],
        std: [1.0 / 255.0; 3],
        ..MultiCrop::new(global, local, n_local)
    }
}

fn check_views_match_crops(img: &Raster, mc: &MultiCrop, images: u64) {
    let mut flips = [0usize; 2];
    let mut checked = 0usize;
    for i in 0..images {
        let mut rng = stream(5, Purpose::Augment, 0, i);
        for (v, view) in mc.augment(img, &mut rng).unwrap().iter().enumerate() {
            let c = view.crop;
            assert_eq!(view.size(), mc.view_size(v));
            assert!(c.x >= 0.0 && c.y >= 0.0 && c.w >= 1.0 && c.h >= 1.0);
            assert!(
                c.x + c.w <= img.width() as f32 && c.y + c.h <= img.height() as f32,
                "{c:?}"
            );
            assert_eq!(c.x.fract(), 0.0);
            flips[c.flipped as usize] += 1;
            let s = view.size();
            // Filter half-width in source pixels along each axis.
            let (sx, sy) = ((c.w / s as f32).max(1.0), (c.h / s as f32).max(1.0));
            for oy in 0..s {
                for ox in 0..s {
                    let u = (ox as f32 + 0.5) / s as f32 * 2.0 - 1.0;
                    let w = (oy as f32 + 0.5) / s as f32 * 2.0 - 1.0;
                    let (px, py) = c.from_normalized(u, w);
                    let inner_x = px - c.x >= sx + 0.5 && c.x + c.w - px >= sx + 0.5;
                    let inner_y = py - c.y >= sy + 0.5 && c.y + c.h - py >= sy + 0.5;
                    if inner_x {
                        let r = view.pixels[[0, oy, ox]];
                        assert!(
                            (r - (px - 0.5)).abs() < TOL,
                            "view {v} ({ox},{oy}) r={r} want {}",
                            px - 0.5
                        );
                        checked += 1;
                    }
                    if inner_y {
                        let g = view.pixels[[1, oy, ox]];
                        assert!(
                            (g - (py - 0.5)).abs() < TOL,
                            "view {v} ({ox},{oy}) g={g} want {}",
                            py - 0.5
                        );
                    }
                    assert!((view.pixels[[2, oy, ox]] - 7.0).abs() < 1e-3);
                }
            }
        }
    }
    assert!(flips[0] > 0 && flips[1] > 0, "{flips:?}");
    assert!(checked > 1000, "{checked}");
}

#[test]
fn views_are_their_recorded_crops_when_shrinking() {
    check_views_match_crops(&ramp(200, 150), &geometry_only(48, 20, 4), 12);
}

#[test]
fn views_are_their_recorded_crops_when_enlarging() {
    check_views_match_crops(&ramp(24, 20), &geometry_only(32, 16, 4), 12);
}

#[test]
fn same_stream_same_views_and_gray_sources_expand() {
    let mc = MultiCrop::new(16, 8, 3);
    mc.validate().unwrap();
    let img = ramp(30, 20);
    let a = mc
        .augment(&img, &mut stream(1, Purpose::Augment, 0, 0))
        .unwrap();
    let b = mc
        .augment(&img, &mut stream(1, Purpose::Augment, 0, 0))
        .unwrap();
    let c = mc
        .augment(&img, &mut stream(1, Purpose::Augment, 0, 1))
        .unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 5);
    assert!(a.iter().all(|v| v.pixels.iter().all(|p| p.is_finite())));

    let gray = Raster::new(10, 10, 1, (0..100).map(|i| (i * 2) as u8).collect()).unwrap();
    let mc = MultiCrop {
        mean: [0.0; 3],
        std: [1.0; 3],
        ..MultiCrop::new(8, 4, 1)
    };
    for view in mc
        .augment(&gray, &mut stream(2, Purpose::Augment, 0, 0))
        .unwrap()
    {
        let plane = |c| view.pixels.index_axis(ndarray::Axis(0), c);
        assert_eq!(plane(0), plane(1));
        assert_eq!(plane(0), plane(2));
    }
}

#[test]
fn validation_rejects_bad_settings() {
    let bad = [
        MultiCrop {
            global_scale: (0.0, 1.0),
            ..MultiCrop::default()
        },
        MultiCrop {
            local_scale: (0.5, 0.4),
            ..MultiCrop::default()
        },
        MultiCrop {
            flip_p: 1.5,
            ..MultiCrop::default()
        },
        MultiCrop {
            global_size: 0,
            ..MultiCrop::default()
        },
        MultiCrop {
            std: [1.0, 0.0, 1.0],
            ..MultiCrop::default()
        },
    ];
    for mc in bad {
        assert!(
            matches!(mc.validate(), Err(DataError::Config { .. })),
            "{mc:?}"
        );
    }
    MultiCrop::default().validate().unwrap();
}

//! Loader behaviour: shapes, determinism across threads and resumption,
//! epochs, drop-last, errors and shutdown.

use super::augment::{view_pairs, MultiCrop};
use super::*;

fn tiny_split(n: usize) -> Split {
    SyntheticConfig {
        size: 16,
        train: n,
        test: 0,
        seed: 1,
    }
    .generate()
    .unwrap()
    .train
}

fn cfg(threads: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: 4,
        seed: 11,
        threads,
        prefetch: 2,
        ..LoaderConfig::default()
    }
}

fn mc() -> MultiCrop {
    MultiCrop::new(16, 8, 3)
}

#[test]
fn batch_layout() {
    let split = tiny_split(10);
    let b = batch_at(&split, &mc(), &cfg(1), Position::default()).unwrap();
    assert_eq!(b.globals.dim(), (2, 4, 3, 16, 16));
    assert_eq!(b.locals.dim(), (3, 4, 3, 8, 8));
    assert_eq!(b.global_view(1).dim(), (4, 3, 16, 16));
    assert!(b.globals.is_standard_layout() && b.locals.is_standard_layout());
    assert_eq!(b.view(4), b.local_view(2));
    assert_eq!(b.crops.len(), 4 * 5);
    assert_eq!(b.grids.len(), view_pairs(5).len());
    assert_eq!(b.grids.len(), 8);
    for (g, (t, s)) in b.grids.iter().zip(view_pairs(5)) {
        assert_eq!((g.teacher, g.student), (t, s));
        assert_eq!(g.teacher_grid.len(), 4 * g.hs * g.ws * 2);
        assert_eq!((g.hs, g.ws), if s < 2 { (13, 13) } else { (6, 6) });
    }
    for (k, &i) in b.indices.iter().enumerate() {
        assert_eq!(b.labels[k], split.label(i));
        for c in b.image_crops(k) {
            assert!(c.x + c.w <= 16.0 && c.y + c.h <= 16.0);
        }
    }
    assert_eq!(b.pair_grids(Default::default()), b.grids);
    // Each view's slot of each image was written.
    assert!(b
        .globals
        .as_slice()
        .unwrap()
        .chunks(3 * 16 * 16)
        .all(|v| v.iter().any(|&x| x != 0.0)));
}

fn take(loader: Loader, n: usize) -> Vec<Batch> {
    loader.take(n).map(|b| b.unwrap()).collect()
}

#[test]
fn same_batches_for_any_thread_count_and_on_resume() {
    let split = tiny_split(12);
    let one = take(
        Loader::new(split.clone(), mc(), cfg(1), Position::default()).unwrap(),
        5,
    );
    let three = take(
        Loader::new(split.clone(), mc(), cfg(3), Position::default()).unwrap(),
        5,
    );
    assert_eq!(one, three);
    // 3 steps per epoch: batch 4 is epoch 1, step 1.
    assert_eq!(one[4].position, Position { epoch: 1, step: 1 });
    let resumed = take(
        Loader::new(split.clone(), mc(), cfg(2), Position { epoch: 1, step: 1 }).unwrap(),
        1,
    );
    assert_eq!(resumed[0], one[4]);
    assert_eq!(
        batch_at(&split, &mc(), &cfg(1), Position { epoch: 0, step: 2 }).unwrap(),
        one[2]
    );
    // Another seed changes both order and views.
    let other = batch_at(
        &split,
        &mc(),
        &LoaderConfig { seed: 12, ..cfg(1) },
        Position::default(),
    )
    .unwrap();
    assert_ne!(other.globals, one[0].globals);
}

#[test]
fn masks_of_the_global_crops_are_reproducible_and_leave_the_crops_alone() {
    use super::augment::mask::MaskConfig;
    let split = tiny_split(12);
    let grid = (4, 4); // 16-px global crops, 4-px patches
    let masked = LoaderConfig {
        masks: Some(MaskConfig {
            probability: 0.75,
            ..MaskConfig::ibot(grid)
        }),
        ..cfg(1)
    };
    let one = take(
        Loader::new(split.clone(), mc(), masked.clone(), Position::default()).unwrap(),
        5,
    );
    let three = take(
        Loader::new(
            split.clone(),
            mc(),
            LoaderConfig {
                threads: 3,
                ..masked.clone()
            },
            Position::default(),
        )
        .unwrap(),
        5,
    );
    assert_eq!(one, three);
    // Resumed mid-epoch: the same masks.
    let resumed = take(
        Loader::new(
            split.clone(),
            mc(),
            masked.clone(),
            Position { epoch: 1, step: 1 },
        )
        .unwrap(),
        1,
    );
    assert_eq!(resumed[0], one[4]);
    let plain = take(
        Loader::new(split.clone(), mc(), cfg(1), Position::default()).unwrap(),
        5,
    );
    let mut crops_masked = 0;
    for (m, p) in one.iter().zip(&plain) {
        // Only the two global crops of each image carry a mask.
        assert_eq!(m.masks.dim(), (2, 4, 4, 4));
        assert_eq!(m.mask_view(1).map(|v| v.dim()), Some((4, 4, 4)));
        assert!(p.masks.is_empty() && p.mask_view(0).is_none());
        assert_eq!(
            (&m.globals, &m.locals, &m.crops),
            (&p.globals, &p.locals, &p.crops)
        );
        crops_masked += m
            .masks
            .as_slice()
            .unwrap()
            .chunks(16)
            .filter(|c| c.contains(&true))
            .count();
    }
    assert!(
        (10..40).contains(&crops_masked),
        "{crops_masked} of 40 crops masked"
    );
    // Another seed, other masks.
    let other = batch_at(
        &split,
        &mc(),
        &LoaderConfig {
            seed: 12,
            ..masked.clone()
        },
        Position::default(),
    )
    .unwrap();
    assert_ne!(other.masks, one[0].masks);
    let bad = LoaderConfig {
        masks: Some(MaskConfig {
            ratio: (0.6, 0.2),
            ..MaskConfig::ibot(grid)
        }),
        ..cfg(1)
    };
    let e = Loader::new(split, mc(), bad, Position::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("mask ratio"), "{e}");
}

#[test]
fn epochs_shuffle_and_drop_last() {
    let split = tiny_split(10);
    let c = LoaderConfig {
        epochs: Some(2),
        ..cfg(2)
    };
    let loader = Loader::new(split, mc(), c, Position::default()).unwrap();
    assert_eq!(loader.steps_per_epoch(), 2);
    let all: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
    assert_eq!(all.len(), 4);
    let seen = |e: usize| {
        let mut v: Vec<usize> = all[2 * e..2 * e + 2]
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    assert_eq!(seen(0).len(), 8);
    assert_ne!(all[0].indices, all[2].indices);
    // The same image gets new views in a new epoch.
    let i = all[0].indices[0];
    let later = all[2..]
        .iter()
        .find_map(|b| b.indices.iter().position(|&j| j == i).map(|k| (b, k)));
    if let Some((b, k)) = later {
        assert_ne!(b.image_crops(k), all[0].image_crops(0));
    }
}

#[test]
fn rejects_bad_settings() {
    let split = tiny_split(3);
    let e = |c: LoaderConfig, p: Position| Loader::new(split.clone(), mc(), c, p).err().unwrap();
    assert!(e(cfg(1), Position::default())
        .to_string()
        .contains("no full batch"));
    let split = tiny_split(8);
    let err = Loader::new(split, mc(), cfg(1), Position { epoch: 0, step: 2 })
        .err()
        .unwrap();
    assert!(err.to_string().contains("past"), "{err}");
}

#[test]
fn dropping_a_running_loader_stops_it() {
    let split = tiny_split(40);
    let mut loader = Loader::new(
        split,
        mc(),
        LoaderConfig {
            prefetch: 1,
            ..cfg(2)
        },
        Position::default(),
    )
    .unwrap();
    assert!(loader.next().unwrap().is_ok());
    let t = std::time::Instant::now();
    drop(loader);
    assert!(t.elapsed().as_secs() < 5);
}

#[test]
fn corrupt_file_error_reaches_the_consumer() {
    let d = std::env::temp_dir().join(format!("sere-loader-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("c")).unwrap();
    for k in 0..3 {
        image::RgbImage::from_pixel(12, 10, image::Rgb([k * 40, 9, 200]))
            .save(d.join(format!("c/{k}.png")))
            .unwrap();
    }
    std::fs::write(d.join("c/3.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let split = DataSpec::parse(&format!("folder:{}", d.display()))
        .unwrap()
        .open()
        .unwrap()
        .train;
    let c = LoaderConfig {
        shuffle: false,
        ..cfg(2)
    };
    let mut loader = Loader::new(split, mc(), c, Position::default()).unwrap();
    let e = loader.next().unwrap().unwrap_err();
    assert!(e.to_string().contains("3.png"), "{e}");
    assert!(loader.next().is_none());
    std::fs::remove_dir_all(&d).unwrap();
}

/// `a` then `b` along the batch of a view-major `[V][B][..]` buffer.
fn concat_batches<T: Clone>(a: &[T], b: &[T], views: usize) -> Vec<T> {
    if views == 0 || a.is_empty() {
        return Vec::new();
    }
    let (na, nb) = (a.len() / views, b.len() / views);
    (0..views)
        .flat_map(|v| {
            let (x, y) = (&a[v * na..(v + 1) * na], &b[v * nb..(v + 1) * nb]);
            x.iter().chain(y).cloned().collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn shards_of_a_batch_concatenate_to_the_whole_batch() {
    use super::augment::mask::MaskConfig;
    use crate::dist::Shard;
    let split = tiny_split(12);
    let whole_cfg = LoaderConfig {
        masks: Some(MaskConfig::ibot((4, 4))),
        ..cfg(1)
    };
    let pos = Position { epoch: 1, step: 2 };
    let whole = batch_at(&split, &mc(), &whole_cfg, pos).unwrap();
    let shard = |rank| {
        let c = LoaderConfig {
            shard: Shard { rank, world: 2 },
            ..whole_cfg.clone()
        };
        batch_at(&split, &mc(), &c, pos).unwrap()
    };
    let (a, b) = (shard(0), shard(1));
    assert_eq!((a.batch_size, b.batch_size), (2, 2));
    // Each view's batch is split along its image axis.
    let cat = |x, y| ndarray::concatenate(ndarray::Axis(1), &[x, y]).unwrap();
    assert_eq!(cat(a.globals.view(), b.globals.view()), whole.globals);
    assert_eq!(cat(a.locals.view(), b.locals.view()), whole.locals);
    let cat = |x, y| ndarray::concatenate(ndarray::Axis(1), &[x, y]).unwrap();
    assert_eq!(cat(a.masks.view(), b.masks.view()), whole.masks);
    assert_eq!(concat_batches(&a.crops, &b.crops, 1), whole.crops);
    assert_eq!(concat_batches(&a.indices, &b.indices, 1), whole.indices);
    assert_eq!(concat_batches(&a.labels, &b.labels, 1), whole.labels);
    for ((ga, gb), g) in a.grids.iter().zip(&b.grids).zip(&whole.grids) {
        assert_eq!(concat_batches(&ga.valid, &gb.valid, 1), g.valid);
        assert_eq!(
            concat_batches(&ga.teacher_grid, &gb.teacher_grid, 1),
            g.teacher_grid
        );
        assert_eq!(
            concat_batches(&ga.student_grid, &gb.student_grid, 1),
            g.student_grid
        );
    }
    // A batch the processes cannot share evenly is refused, by name.
    let odd = LoaderConfig {
        shard: Shard { rank: 0, world: 3 },
        ..whole_cfg
    };
    let err = batch_at(&split, &mc(), &odd, pos).unwrap_err().to_string();
    assert!(err.contains("multiple of the process count"), "{err}");
}

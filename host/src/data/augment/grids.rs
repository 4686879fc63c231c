//! Sampling grids of the spatial relation loss, one pair of grids per
//! (teacher global view, student view) pair of one image, computed from the
//! crops' recorded rectangles through `sere_core::geometry::overlap_grids`.
//!
//! Views are numbered as the loader lays them out: `0` and `1` are the two
//! global views, `2 ..` the local ones. Teachers only see global views, so
//! the pairs are `(t, s)` with `t` in `{0, 1}` and every `s != t`.

use sere_core::geometry::{overlap_grids, CropBox, GridPlacement};

/// Number of global views per image.
pub const N_GLOBAL: usize = 2;

/// Grid sizes `(hs, ws)`: for a global student view (13 x 13 in the paper)
/// and for a local one (6 x 6); and where the points sit in the overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridSizes {
    /// Global-global pairs.
    pub global: (usize, usize),
    /// Global-local pairs.
    pub local: (usize, usize),
    /// Cell centres (default) or edge to edge (the authors' code).
    pub placement: GridPlacement,
}

impl Default for GridSizes {
    fn default() -> Self {
        GridSizes {
            global: (13, 13),
            local: (6, 6),
            placement: GridPlacement::default(),
        }
    }
}

impl GridSizes {
    /// The `(hs, ws)` used when `student` is the student view.
    pub fn for_student(&self, student: usize) -> (usize, usize) {
        if student < N_GLOBAL {
            self.global
        } else {
            self.local
        }
    }
}

/// All `(teacher, student)` view pairs for `n_views` views per image, in the
/// fixed order used everywhere: teacher 0 first, students ascending.
///
/// ```
/// use sere_host::augment::view_pairs;
/// assert_eq!(view_pairs(3), vec![(0, 1), (0, 2), (1, 0), (1, 2)]);
/// ```
pub fn view_pairs(n_views: usize) -> Vec<(usize, usize)> {
    (0..N_GLOBAL.min(n_views))
        .flat_map(|t| (0..n_views).filter(move |&s| s != t).map(move |s| (t, s)))
        .collect()
}

/// The two grids of one view pair of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct PairGrid {
    /// Teacher view index (0 or 1).
    pub teacher: usize,
    /// Student view index (!= teacher).
    pub student: usize,
    /// Grid rows.
    pub hs: usize,
    /// Grid columns.
    pub ws: usize,
    /// `(teacher grid, student grid)`, each `hs * ws` `(x, y)` pairs in the
    /// views' normalized coordinates, or `None` when the crops do not
    /// overlap (that pair has no spatial term).
    pub grids: Option<(Vec<f32>, Vec<f32>)>,
}

/// Grids of one overlapping pair, or `None`.
fn pair(
    a: &CropBox,
    b: &CropBox,
    (hs, ws): (usize, usize),
    placement: GridPlacement,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let (mut ga, mut gb) = (vec![0.0; hs * ws * 2], vec![0.0; hs * ws * 2]);
    match overlap_grids(a, b, hs, ws, placement, &mut ga, &mut gb) {
        Ok(Some(_)) => Some((ga, gb)),
        // Crops made by the augmenter are always valid; an invalid record
        // (or no overlap) simply has no spatial term.
        _ => None,
    }
}

/// For one image's crops (`crops[v]` for view `v`), the grids of every view
/// pair of [`view_pairs`].
pub fn image_pair_grids(crops: &[CropBox], sizes: GridSizes) -> Vec<PairGrid> {
    view_pairs(crops.len())
        .into_iter()
        .map(|(t, s)| {
            let (hs, ws) = sizes.for_student(s);
            PairGrid {
                teacher: t,
                student: s,
                hs,
                ws,
                grids: pair(&crops[t], &crops[s], (hs, ws), sizes.placement),
            }
        })
        .collect()
}

/// The grids of one view pair for a whole batch, laid out for the step:
/// `teacher_grid` and `student_grid` are `[B][hs][ws][2]`; images whose
/// crops do not overlap have `valid[b] == false` and zero grids.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPairGrids {
    /// Teacher view index (0 or 1).
    pub teacher: usize,
    /// Student view index.
    pub student: usize,
    /// Grid rows.
    pub hs: usize,
    /// Grid columns.
    pub ws: usize,
    /// `[B][hs][ws][2]` points in the teacher view.
    pub teacher_grid: Vec<f32>,
    /// `[B][hs][ws][2]` points in the student view.
    pub student_grid: Vec<f32>,
    /// Per image: whether the pair overlaps.
    pub valid: Vec<bool>,
}

impl BatchPairGrids {
    /// Number of images whose crops overlap.
    pub fn n_valid(&self) -> usize {
        self.valid.iter().filter(|&&v| v).count()
    }
}

/// Grids of every view pair for a batch whose crops are stored image-major:
/// `crops[b * n_views + v]`.
pub fn batch_pair_grids(
    crops: &[CropBox],
    n_views: usize,
    sizes: GridSizes,
) -> Vec<BatchPairGrids> {
    let b = crops.len().checked_div(n_views).unwrap_or(0);
    view_pairs(n_views)
        .into_iter()
        .map(|(t, s)| {
            let (hs, ws) = sizes.for_student(s);
            let p = hs * ws * 2;
            let mut out = BatchPairGrids {
                teacher: t,
                student: s,
                hs,
                ws,
                teacher_grid: vec![0.0; b * p],
                student_grid: vec![0.0; b * p],
                valid: vec![false; b],
            };
            for i in 0..b {
                let (ct, cs) = (&crops[i * n_views + t], &crops[i * n_views + s]);
                let ga = &mut out.teacher_grid[i * p..(i + 1) * p];
                let gb = &mut out.student_grid[i * p..(i + 1) * p];
                out.valid[i] = matches!(
                    overlap_grids(ct, cs, hs, ws, sizes.placement, ga, gb),
                    Ok(Some(_))
                );
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cb(x: f32, y: f32, w: f32, h: f32, f: bool) -> CropBox {
        CropBox::new(x, y, w, h, f).unwrap()
    }

    #[test]
    fn grids_map_back_to_the_same_source_points() {
        let crops = [
            cb(0.0, 0.0, 20.0, 16.0, false),
            cb(6.0, 3.0, 18.0, 20.0, true),
            cb(10.0, 8.0, 5.0, 6.0, true),
            cb(40.0, 40.0, 4.0, 4.0, false), // overlaps nothing
        ];
        let sizes = GridSizes::default();
        let pg = image_pair_grids(&crops, sizes);
        assert_eq!(pg.len(), 6);
        for p in &pg {
            let (t, s) = (&crops[p.teacher], &crops[p.student]);
            assert_eq!((p.hs, p.ws), sizes.for_student(p.student));
            let Some((gt, gs)) = &p.grids else {
                assert_eq!(p.student, 3);
                continue;
            };
            for k in 0..p.hs * p.ws {
                let a = t.from_normalized(gt[2 * k], gt[2 * k + 1]);
                let b = s.from_normalized(gs[2 * k], gs[2 * k + 1]);
                assert!(
                    (a.0 - b.0).abs() < 1e-4 && (a.1 - b.1).abs() < 1e-4,
                    "{a:?} {b:?}"
                );
                // Strictly inside both views.
                for g in [gt, gs] {
                    assert!(g[2 * k].abs() < 1.0 && g[2 * k + 1].abs() < 1.0);
                }
            }
        }
        let batch = batch_pair_grids(&[crops, crops].concat(), 4, sizes);
        for (bp, ip) in batch.iter().zip(&pg) {
            assert_eq!((bp.teacher, bp.student), (ip.teacher, ip.student));
            assert_eq!(bp.valid, vec![ip.grids.is_some(); 2]);
            if let Some((gt, gs)) = &ip.grids {
                assert_eq!(&bp.teacher_grid[gt.len()..], &gt[..]);
                assert_eq!(&bp.student_grid[..gs.len()], &gs[..]);
            }
        }
    }
}

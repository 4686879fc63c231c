//! Limited-memory BFGS for the probe's smooth convex objective: two-loop
//! recursion, Armijo backtracking, `f32` parameters with `f64` dot products,
//! all buffers allocated before the first iteration.

/// History length.
const MEMORY: usize = 10;

/// Iterations and loss evaluations of an L-BFGS run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LbfgsRun {
    /// Accepted steps.
    pub iterations: usize,
    /// Objective evaluations.
    pub evaluations: usize,
    /// Final objective value.
    pub loss: f64,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&u, &v)| u as f64 * v as f64).sum()
}

/// Minimises `f` (value, gradient written to its second argument) from
/// `x` with L-BFGS (two-loop recursion, history of 10 pairs, Armijo
/// backtracking), using at most `max_evals` evaluations. Stops early when
/// the gradient vanishes or a step no longer lowers the objective.
pub fn lbfgs(
    mut f: impl FnMut(&[f32], &mut [f32]) -> f64,
    x: &mut [f32],
    max_evals: usize,
) -> LbfgsRun {
    let p = x.len();
    let (mut g, mut g_new, mut dir) = (vec![0.0f32; p], vec![0.0f32; p], vec![0.0f32; p]);
    let mut x_new = vec![0.0f32; p];
    let (mut s_hist, mut y_hist) = (vec![0.0f32; MEMORY * p], vec![0.0f32; MEMORY * p]);
    let (mut rho, mut alpha) = ([0.0f64; MEMORY], [0.0f64; MEMORY]);
    let (mut len, mut head) = (0usize, 0usize); // head: next slot to write
    let mut fx = f(x, &mut g);
    let mut run = LbfgsRun {
        iterations: 0,
        evaluations: 1,
        loss: fx,
    };
    let gtol = 1e-7;
    while run.evaluations < max_evals {
        if g.iter().all(|v| v.abs() <= gtol) {
            break;
        }
        // dir = -H g by the two-loop recursion.
        dir.copy_from_slice(&g);
        for j in 0..len {
            let i = (head + MEMORY - 1 - j) % MEMORY;
            let a = rho[i] * dot(&s_hist[i * p..(i + 1) * p], &dir);
            alpha[i] = a;
            for (q, &yv) in dir.iter_mut().zip(&y_hist[i * p..(i + 1) * p]) {
                *q -= (a as f32) * yv;
            }
        }
        let gamma = if len > 0 {
            let i = (head + MEMORY - 1) % MEMORY;
            let yi = &y_hist[i * p..(i + 1) * p];
            dot(&s_hist[i * p..(i + 1) * p], yi) / dot(yi, yi)
        } else {
            1.0 / dot(&g, &g).sqrt().max(1.0)
        };
        dir.iter_mut().for_each(|q| *q *= gamma as f32);
        for j in (0..len).rev() {
            let i = (head + MEMORY - 1 - j) % MEMORY;
            let beta = rho[i] * dot(&y_hist[i * p..(i + 1) * p], &dir);
            for (q, &sv) in dir.iter_mut().zip(&s_hist[i * p..(i + 1) * p]) {
                *q += ((alpha[i] - beta) as f32) * sv;
            }
        }
        dir.iter_mut().for_each(|q| *q = -*q);
        let dg = dot(&g, &dir);
        if dg.is_nan() || dg >= 0.0 {
            if len == 0 {
                break; // not even steepest descent descends: at precision
            }
            len = 0; // a stale history: restart from steepest descent
            continue;
        }
        // Backtracking line search on the Armijo condition.
        let mut t = 1.0f32;
        let mut accepted = false;
        while run.evaluations < max_evals && t > 1e-10 {
            for ((xn, &xv), &dv) in x_new.iter_mut().zip(x.iter()).zip(&dir) {
                *xn = xv + t * dv;
            }
            let fn_ = f(&x_new, &mut g_new);
            run.evaluations += 1;
            if fn_.is_finite() && fn_ <= fx + 1e-4 * t as f64 * dg {
                accepted = fn_ < fx;
                if accepted {
                    fx = fn_;
                }
                break;
            }
            t *= 0.5;
        }
        if !accepted {
            if len == 0 {
                break;
            }
            len = 0;
            continue;
        }
        // History update s = x_new - x, y = g_new - g.
        let (si, yi) = (
            &mut s_hist[head * p..(head + 1) * p],
            &mut y_hist[head * p..(head + 1) * p],
        );
        for k in 0..p {
            si[k] = x_new[k] - x[k];
            yi[k] = g_new[k] - g[k];
        }
        let sy = dot(si, yi);
        if sy > 1e-10 * dot(yi, yi).max(f64::MIN_POSITIVE) {
            rho[head] = 1.0 / sy;
            head = (head + 1) % MEMORY;
            len = (len + 1).min(MEMORY);
        }
        x.copy_from_slice(&x_new);
        std::mem::swap(&mut g, &mut g_new);
        run.iterations += 1;
        run.loss = fx;
    }
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lbfgs_minimises_an_ill_conditioned_quadratic() {
        let scales = [1.0f64, 10.0, 100.0, 1000.0];
        let centre = [1.0f32, -2.0, 0.5, 3.0];
        let mut x = [0.0f32; 4];
        let run = lbfgs(
            |p, g| {
                let mut f = 0.0;
                for i in 0..4 {
                    let e = (p[i] - centre[i]) as f64;
                    f += 0.5 * scales[i] * e * e;
                    g[i] = (scales[i] * e) as f32;
                }
                f
            },
            &mut x,
            200,
        );
        for i in 0..4 {
            assert!((x[i] - centre[i]).abs() < 1e-3, "{x:?} after {run:?}");
        }
        assert!(run.evaluations <= 200 && run.loss < 1e-6, "{run:?}");
    }
}

//! The arithmetic of DeepSeek-V3-style routing, shared by the CPU router
//! (`moe_experts::route_grouped`) and the GPU kernel (`router_grouped`), so that the
//! two agree bit for bit.
//!
//! Every function here uses only IEEE-754 single-precision adds, multiplies and
//! divides, rounded to nearest, with no fused multiply-add: x86-64 and the NVPTX
//! backend (which emits `add.rn`, `mul.rn`, `div.rn`, so `ptxas` may not contract them)
//! round each operation alike. A platform `exp` (libm's, or the GPU's `ex2.approx`)
//! would differ in the last bit between the two, and a last bit can change a choice.

/// `ln 2` split for Cody-Waite reduction: `LN2_HI` has 9 significant bits, so `n *
/// LN2_HI` is exact for every `|n| <= 150`.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `2^n` for `n` in `-126..=127`, from its bits.
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `e^x` within 2 ulp of the true value, the same bits on every target: `x` split as
/// `n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its degree-7 Taylor polynomial (the
/// first omitted term is below `2^-27`), scaled by `2^n` in two exact steps so that
/// results in the subnormal range round once.
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 89.0 {
        return f32::INFINITY;
    }
    if x < -104.0 {
        return 0.0;
    }
    let t = x * core::f32::consts::LOG2_E;
    // Round to nearest; `t` is within `-150.1..128.5`.
    let n = if t >= 0.0 {
        (t + 0.5) as i32
    } else {
        (t - 0.5) as i32
    };
    let nf = n as f32;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.666_666_7e-1
                    + r * (4.166_666_8e-2
                        + r * (8.333_334e-3 + r * (1.388_888_9e-3 + r * 1.984_127e-4))))));
    // `n` in `-150..=128`: both halves in `-75..=64`, so `p * 2^n1` is exact.
    let n1 = n / 2;
    p * pow2(n1) * pow2(n - n1)
}

/// `1 / (1 + e^-x)`: a token's score for an expert.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `value` as the routers compare it: NaN ranks below everything (as `-inf`), so a
/// NaN logit is never preferred and every comparison is a total order.
pub fn rank(value: f32) -> f32 {
    if value.is_nan() {
        f32::NEG_INFINITY
    } else {
        value
    }
}

/// An expert's choice score: its `score` plus its `bias` (`e_score_correction_bias`),
/// ranked.
pub fn choice_score(score: f32, bias: f32) -> f32 {
    rank(score + bias)
}

/// A group's score: the sum of its two highest choice scores (`members` has at least
/// two), ranked.
pub fn group_score(members: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &c in members {
        if c > first {
            (first, second) = (c, first);
        } else if c > second {
            second = c;
        }
    }
    rank(first + second)
}

/// Turns the chosen experts' scores, in choice order, into their weights: divided by
/// their sum (plus `1e-20`, summed in order) when `norm`, then times `scale`
/// (`routed_scaling_factor`).
pub fn finish_weights(weights: &mut [f32], norm: bool, scale: f32) {
    let mut total = 0.0f32;
    for &w in weights.iter() {
        total += w;
    }
    let denominator = if norm { total + 1e-20 } else { 1.0 };
    for w in weights.iter_mut() {
        *w = *w / denominator * scale;
    }
}

#[cfg(all(test, not(target_arch = "nvptx64")))]
mod tests {
    extern crate std;
    use super::*;

    /// Distance in units in the last place between two finite floats of one sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_everywhere() {
        let mut worst = 0;
        // A million points from -104 to 89 (subnormal results to overflow's edge),
        // and tiny arguments of both signs.
        let steps = 1_000_000;
        let points = (0..=steps)
            .map(|i| -104.0 + 193.0 * (i as f64 / steps as f64))
            .chain((-40..0).map(|p| 10f64.powi(p)))
            .chain((-40..0).map(|p| -(10f64.powi(p))));
        for x in points {
            let x = x as f32;
            let want = (x as f64).exp();
            let got = exp(x);
            if want < f32::MAX as f64 {
                let e = ulps(got, want as f32);
                assert!(e <= 2, "exp({x}) = {got}, want {want}");
                worst = worst.max(e);
            } else {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            }
        }
        assert!(worst <= 2);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-200.0), 0.0);
    }

    #[test]
    fn sigmoid_is_monotonic_and_saturates() {
        let mut previous = 0.0;
        for i in -4000..4000 {
            let s = sigmoid(i as f32 / 100.0);
            assert!(s >= previous && (0.0..=1.0).contains(&s), "{i}");
            previous = s;
        }
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn groups_score_their_two_best_and_nan_ranks_last() {
        assert_eq!(group_score(&[0.1, 0.7, 0.3, 0.7]), 1.4);
        assert_eq!(group_score(&[0.5, f32::NAN, 0.25]), 0.75);
        assert_eq!(rank(f32::NAN), f32::NEG_INFINITY);
        assert_eq!(
            choice_score(f32::INFINITY, f32::NEG_INFINITY),
            f32::NEG_INFINITY
        );
        let mut w = [0.25, 0.5, 0.25];
        finish_weights(&mut w, true, 2.0);
        assert_eq!(w, [0.5, 1.0, 0.5]);
        let mut w = [0.25, 0.5];
        finish_weights(&mut w, false, 3.0);
        assert_eq!(w, [0.75, 1.5]);
    }
}

//! The routers: softmax over each token's expert logits, top-k, optional
//! renormalisation, as Mixtral and Qwen3-MoE define it; and DeepSeek-V3's sigmoid
//! scores with a score correction and group-limited top-k.

use moe_kernels::routing;

use crate::{ExpertsError, Result};

/// How a block turns a token's router logits into its `K` experts and their weights.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Routing {
    /// Softmax over all `E` logits, the `K` most probable ([`route`]): Mixtral,
    /// Qwen3-MoE.
    #[default]
    Softmax,
    /// DeepSeek-V3's (`scoring_func: sigmoid`, `topk_method: noaux_tc`; Kimi-K2,
    /// GLM-4.5): [`route_grouped`].
    Grouped(GroupedRouting),
}

/// The settings of DeepSeek-V3-style routing, as its `config.json` names them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupedRouting {
    /// `n_group`: the experts are split into this many groups of `E / n_group`.
    pub n_group: usize,
    /// `topk_group`: a token chooses its experts in this many groups.
    pub topk_group: usize,
    /// `routed_scaling_factor`: the routed weights are multiplied by it.
    pub routed_scaling_factor: f32,
}

impl GroupedRouting {
    /// Checks the settings against `E` experts and top-`K`: groups of at least two
    /// experts (a group is scored by its two best), `topk_group` in `1..=n_group`, and
    /// enough experts in the chosen groups for `K`.
    pub fn check(&self, num_experts: usize, top_k: usize) -> Result<()> {
        let bad = |what: String| Err(ExpertsError::Config(what));
        let Self {
            n_group,
            topk_group,
            routed_scaling_factor,
        } = *self;
        if n_group == 0 || num_experts % n_group != 0 || num_experts / n_group < 2 {
            return bad(format!(
                "n_group {n_group} must divide the {num_experts} experts into groups of at least 2"
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return bad(format!(
                "topk_group {topk_group} must be in 1..={n_group} (n_group)"
            ));
        }
        if top_k > topk_group * (num_experts / n_group) {
            return bad(format!(
                "top_k {top_k} is more than the {} experts of {topk_group} groups",
                topk_group * (num_experts / n_group)
            ));
        }
        if !routed_scaling_factor.is_finite() {
            return bad(format!(
                "routed_scaling_factor {routed_scaling_factor} is not finite"
            ));
        }
        Ok(())
    }
}

/// Routes every token from its `E` logits: the `K` experts with the largest logits (a
/// tie goes to the lower expert id; softmax is monotonic, so these are the `K` most
/// probable), weighted by their softmax probability, renormalised to sum to 1 when
/// `norm_topk_prob`. Writes `topk_ids` and `topk_weights` (`[N, K]` each).
///
/// The GPU's `router_topk` kernel computes the same function. Fails, without writing,
/// when `top_k` is not in `1..=num_experts`, `num_experts` does not fit in i32 or the
/// slices do not hold whole tokens.
pub fn route(
    logits: &[f32],
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    topk_ids: &mut [i32],
    topk_weights: &mut [f32],
) -> Result<()> {
    check_slices(logits, num_experts, top_k, topk_ids, topk_weights)?;
    for ((logits, ids), weights) in logits
        .chunks_exact(num_experts)
        .zip(topk_ids.chunks_exact_mut(top_k))
        .zip(topk_weights.chunks_exact_mut(top_k))
    {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
        let mut chosen_total = 0.0;
        for k in 0..top_k {
            // The best expert not chosen yet (ties keep the lower id); k < top_k <=
            // num_experts, so one is left to choose.
            let best = best_unchosen(logits, |e| ids[..k].contains(&(e as i32)));
            ids[k] = best as i32;
            weights[k] = (logits[best] - max).exp();
            chosen_total += weights[k];
        }
        let denominator = if norm_topk_prob { chosen_total } else { total };
        for w in weights.iter_mut() {
            *w /= denominator;
        }
    }
    Ok(())
}

/// Routes every token as DeepSeek-V3 does: scores `s = sigmoid(logit)`; choice
/// scores `c = s + bias` (`e_score_correction_bias`, for the choice only); each group
/// of `E / n_group` experts scored by the sum of its two highest `c`; the
/// `topk_group` best groups kept; among their experts the `K` highest `c`; weights
/// the uncorrected `s` of those, divided by their sum (plus 1e-20) when
/// `norm_topk_prob`, times `routed_scaling_factor`. Ties go to the lower group and
/// the lower expert id; a NaN ranks below every number. Writes `topk_ids` and
/// `topk_weights` (`[N, K]`), each token's experts in descending `c`.
///
/// The arithmetic is [`moe_kernels::routing`]'s (an `exp` of IEEE adds and multiplies
/// only), which the GPU's `router_grouped` kernel shares: both give the same bits.
///
/// Fails, without writing, when the settings do not fit `E` and `K`
/// ([`GroupedRouting::check`]), `bias` is not `[E]`, or the slices do not hold whole
/// tokens.
#[allow(clippy::too_many_arguments)]
pub fn route_grouped(
    logits: &[f32],
    bias: &[f32],
    num_experts: usize,
    top_k: usize,
    grouped: &GroupedRouting,
    norm_topk_prob: bool,
    topk_ids: &mut [i32],
    topk_weights: &mut [f32],
) -> Result<()> {
    check_slices(logits, num_experts, top_k, topk_ids, topk_weights)?;
    grouped.check(num_experts, top_k)?;
    if bias.len() != num_experts {
        return Err(ExpertsError::Shape {
            tensor: "e_score_correction_bias",
            len: bias.len(),
            expected: format!("{num_experts} values, one per expert"),
        });
    }
    let group_size = num_experts / grouped.n_group;
    let mut scores = vec![0f32; num_experts];
    let mut choice = vec![0f32; num_experts];
    let mut group_scores = vec![0f32; grouped.n_group];
    let mut in_chosen_group = vec![false; grouped.n_group];
    for ((logits, ids), weights) in logits
        .chunks_exact(num_experts)
        .zip(topk_ids.chunks_exact_mut(top_k))
        .zip(topk_weights.chunks_exact_mut(top_k))
    {
        for e in 0..num_experts {
            scores[e] = routing::sigmoid(logits[e]);
            choice[e] = routing::choice_score(scores[e], bias[e]);
        }
        for (group, score) in group_scores.iter_mut().enumerate() {
            *score = routing::group_score(&choice[group * group_size..][..group_size]);
        }
        in_chosen_group.fill(false);
        for _ in 0..grouped.topk_group {
            let best = best_unchosen(&group_scores, |g| in_chosen_group[g]);
            in_chosen_group[best] = true;
        }
        for k in 0..top_k {
            let taken =
                |e: usize| !in_chosen_group[e / group_size] || ids[..k].contains(&(e as i32));
            let best = best_unchosen(&choice, taken);
            ids[k] = best as i32;
            weights[k] = scores[best];
        }
        routing::finish_weights(weights, norm_topk_prob, grouped.routed_scaling_factor);
    }
    Ok(())
}

/// The checks both routers make before writing: `top_k` in `1..=num_experts`,
/// `num_experts` within i32 (the type of `topk_ids`), whole tokens in every slice.
fn check_slices(
    logits: &[f32],
    num_experts: usize,
    top_k: usize,
    topk_ids: &[i32],
    topk_weights: &[f32],
) -> Result<()> {
    if top_k == 0 || top_k > num_experts {
        return Err(ExpertsError::Config(format!(
            "top_k {top_k} must be in 1..={num_experts} (num_experts)"
        )));
    }
    if i32::try_from(num_experts).is_err() {
        return Err(ExpertsError::Config(format!(
            "num_experts {num_experts} does not fit in i32, the type of topk_ids"
        )));
    }
    let tokens = logits.len() / num_experts;
    let whole = logits.len() % num_experts == 0
        && topk_ids.len() == tokens * top_k
        && topk_weights.len() == tokens * top_k;
    if !whole {
        return Err(ExpertsError::Shape {
            tensor: "logits",
            len: logits.len(),
            expected: format!(
                "whole tokens of {num_experts} logits, with topk_ids and topk_weights of {top_k} each"
            ),
        });
    }
    Ok(())
}

/// The index of the largest value not `taken` (strictly larger wins: ties keep the
/// lower index). The callers guarantee one is left.
fn best_unchosen(values: &[f32], taken: impl Fn(usize) -> bool) -> usize {
    let mut best = None::<usize>;
    for (i, &v) in values.iter().enumerate() {
        if taken(i) {
            continue;
        }
        if best.is_none_or(|b| v > values[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_logits_and_normalises() {
        let logits = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        let (mut ids, mut weights) = ([0i32; 3], [0f32; 3]);
        route(&logits, 5, 3, false, &mut ids, &mut weights).unwrap();
        // The tie between experts 1 and 3 goes to 1.
        assert_eq!(ids, [1, 3, 4]);
        let total: f32 = logits.iter().map(|l| (l - 2.0f32).exp()).sum();
        assert!((weights[0] - 1.0 / total).abs() < 1e-6);
        assert!((weights[2] - (-1.0f32).exp() / total).abs() < 1e-6);
        route(&logits, 5, 3, true, &mut ids, &mut weights).unwrap();
        assert!(route(&logits, 5, 6, true, &mut ids, &mut weights).is_err());
        assert!(route(&logits[..4], 5, 3, true, &mut ids, &mut weights).is_err());
        assert!((weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((weights[0] - weights[1]).abs() < 1e-7);
    }

    #[test]
    fn expert_ids_that_do_not_fit_in_i32_are_refused() {
        // No token at all: nothing would be written, but any id could be wrong.
        let error = route(&[], 1 << 31, 1, true, &mut [], &mut []).unwrap_err();
        assert!(matches!(error, ExpertsError::Config(_)), "{error}");
        assert!(route(&[], (1 << 31) - 1, 1, true, &mut [], &mut []).is_ok());
    }

    /// DeepSeek-V3 routing written straight from its definition, by sorting: the
    /// reference for `route_grouped`.
    fn grouped_reference(
        logits: &[f32],
        bias: &[f32],
        k: usize,
        g: &GroupedRouting,
        norm: bool,
    ) -> (Vec<i32>, Vec<f32>) {
        let e = logits.len();
        let size = e / g.n_group;
        let s: Vec<f32> = logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect();
        let c: Vec<f32> = s.iter().zip(bias).map(|(s, b)| s + b).collect();
        // Descending by value, ascending by index among equals.
        let order = |values: &[f32], among: Vec<usize>| {
            let mut among = among;
            among.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
            among
        };
        let group_scores: Vec<f32> = (0..g.n_group)
            .map(|grp| {
                let best = order(&c, (grp * size..(grp + 1) * size).collect());
                c[best[0]] + c[best[1]]
            })
            .collect();
        let groups = order(&group_scores, (0..g.n_group).collect());
        let allowed: Vec<usize> = (0..e)
            .filter(|x| groups[..g.topk_group].contains(&(x / size)))
            .collect();
        let chosen: Vec<usize> = order(&c, allowed).into_iter().take(k).collect();
        let total: f32 = chosen.iter().map(|&x| s[x]).sum();
        let weights = chosen
            .iter()
            .map(|&x| {
                let w = if norm { s[x] / (total + 1e-20) } else { s[x] };
                w * g.routed_scaling_factor
            })
            .collect();
        (chosen.iter().map(|&x| x as i32).collect(), weights)
    }

    #[test]
    fn grouped_routing_matches_its_definition() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for (e, n_group, topk_group, k) in
            [(16, 4, 2, 4), (32, 8, 4, 8), (12, 3, 3, 5), (8, 1, 1, 2)]
        {
            let g = GroupedRouting {
                n_group,
                topk_group,
                routed_scaling_factor: 2.5,
            };
            let tokens = 40;
            // Logits on a coarse grid, so that scores tie within and across groups.
            let logits: Vec<f32> = (0..tokens * e)
                .map(|_| (next() * 8.0).round() / 2.0 - 2.0)
                .collect();
            let bias: Vec<f32> = (0..e)
                .map(|_| (next() * 4.0).round() / 8.0 - 0.25)
                .collect();
            for norm in [false, true] {
                let (mut ids, mut weights) = (vec![0; tokens * k], vec![0.0; tokens * k]);
                route_grouped(&logits, &bias, e, k, &g, norm, &mut ids, &mut weights).unwrap();
                for t in 0..tokens {
                    let (want_ids, want_w) =
                        grouped_reference(&logits[t * e..][..e], &bias, k, &g, norm);
                    assert_eq!(&ids[t * k..][..k], &want_ids[..], "token {t}");
                    for (got, want) in weights[t * k..][..k].iter().zip(&want_w) {
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                            "{got} {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_correction_chooses_but_does_not_weigh() {
        // Expert 1 scores lower but its correction makes it chosen; its weight is its
        // own uncorrected score.
        let logits = [1.0f32, 0.0, -1.0, -2.0];
        let bias = [0.0f32, 0.5, 0.0, 0.0];
        let g = GroupedRouting {
            n_group: 2,
            topk_group: 2,
            routed_scaling_factor: 1.0,
        };
        let (mut ids, mut weights) = ([0i32; 1], [0f32; 1]);
        route_grouped(&logits, &bias, 4, 1, &g, false, &mut ids, &mut weights).unwrap();
        assert_eq!(ids, [1]);
        assert!((weights[0] - 0.5).abs() < 1e-7);
        // Groups with equal sums: the lower group wins.
        let logits = [0.0f32, 0.0, 0.0, 0.0];
        let g = GroupedRouting {
            n_group: 2,
            topk_group: 1,
            routed_scaling_factor: 1.0,
        };
        route_grouped(&logits, &[0.0; 4], 4, 1, &g, true, &mut ids, &mut weights).unwrap();
        assert_eq!((ids, weights), ([0], [1.0]));
        // Settings that do not fit are refused.
        for (n_group, topk_group, k) in [(3, 1, 1), (4, 1, 1), (2, 3, 1), (2, 1, 3)] {
            let g = GroupedRouting {
                n_group,
                topk_group,
                routed_scaling_factor: 1.0,
            };
            let (mut ids, mut weights) = (vec![0i32; k], vec![0f32; k]);
            assert!(
                route_grouped(&logits, &[0.0; 4], 4, k, &g, true, &mut ids, &mut weights).is_err()
            );
        }
    }
}

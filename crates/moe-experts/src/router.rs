//! The router: softmax over each token's expert logits, top-k, optional
//! renormalisation, as Mixtral and Qwen2/Qwen3-MoE define it.

use crate::{ExpertsError, Result};

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
    for ((logits, ids), weights) in logits
        .chunks_exact(num_experts)
        .zip(topk_ids.chunks_exact_mut(top_k))
        .zip(topk_weights.chunks_exact_mut(top_k))
    {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
        let mut chosen_total = 0.0;
        for k in 0..top_k {
            // The best expert not chosen yet: strictly larger wins, so ties keep the
            // lower id.
            let mut best = None::<usize>;
            for (e, &l) in logits.iter().enumerate() {
                if ids[..k].contains(&(e as i32)) {
                    continue;
                }
                if best.is_none_or(|b| l > logits[b]) {
                    best = Some(e);
                }
            }
            // Some: k < top_k <= num_experts, so an expert is left to choose.
            let best = best.unwrap_or_default();
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
}

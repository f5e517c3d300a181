//! Which rank holds which experts: the global table every rank derives from the
//! ranks' own expert maps (the contract's `expert_map`: an expert's local id on this
//! rank, or -1).

use crate::{EpError, Result};

/// Every expert's rank and local id there, for `world` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertPlacement {
    world: usize,
    /// `owner[e]`: the rank that holds expert `e`.
    owner: Vec<usize>,
    /// `local[e]`: `e`'s local id on its rank.
    local: Vec<usize>,
}

impl ExpertPlacement {
    /// Experts split in `world` runs of `E / W`: rank `r` holds experts
    /// `r * E / W .. (r + 1) * E / W`, in that order. `E` must be a multiple of `W`.
    pub fn contiguous(num_experts: usize, world: usize) -> Result<Self> {
        if world == 0 || num_experts == 0 || num_experts % world != 0 {
            return Err(EpError::Placement(format!(
                "{num_experts} experts do not split evenly over {world} ranks; give each \
                 rank its expert map instead"
            )));
        }
        let per_rank = num_experts / world;
        Ok(Self {
            world,
            owner: (0..num_experts).map(|e| e / per_rank).collect(),
            local: (0..num_experts).map(|e| e % per_rank).collect(),
        })
    }

    /// The placement the ranks' expert maps describe (`maps[r]` is rank `r`'s map of
    /// `E` entries). Refused unless every expert is on exactly one rank and each
    /// rank's local ids are `0..L` once each (a rank may hold none).
    pub fn from_expert_maps(maps: &[Vec<i32>]) -> Result<Self> {
        let world = maps.len();
        let num_experts = maps.first().map_or(0, Vec::len);
        if world == 0 || num_experts == 0 {
            return Err(EpError::Placement("no ranks or no experts to place".into()));
        }
        if let Some(rank) = maps.iter().position(|map| map.len() != num_experts) {
            return Err(EpError::Placement(format!(
                "rank {rank}'s expert map has {} entries, rank 0's {num_experts}",
                maps[rank].len()
            )));
        }
        let mut owner = vec![usize::MAX; num_experts];
        let mut local = vec![0; num_experts];
        for (rank, map) in maps.iter().enumerate() {
            let held = map.iter().filter(|&&id| id != -1).count();
            let mut seen = vec![false; held];
            for (expert, &id) in map.iter().enumerate() {
                if id == -1 {
                    continue;
                }
                let Some(slot) = usize::try_from(id).ok().filter(|&id| id < held) else {
                    return Err(EpError::Placement(format!(
                        "rank {rank} maps expert {expert} to local id {id}, outside 0..{held} \
                         (its {held} experts)"
                    )));
                };
                if std::mem::replace(&mut seen[slot], true) {
                    return Err(EpError::Placement(format!(
                        "rank {rank} gives local id {id} to two experts"
                    )));
                }
                if owner[expert] != usize::MAX {
                    return Err(EpError::Placement(format!(
                        "expert {expert} is on two ranks, {} and {rank}",
                        owner[expert]
                    )));
                }
                owner[expert] = rank;
                local[expert] = slot;
            }
        }
        if let Some(expert) = owner.iter().position(|&rank| rank == usize::MAX) {
            return Err(EpError::Placement(format!("expert {expert} is on no rank")));
        }
        Ok(Self {
            world,
            owner,
            local,
        })
    }

    /// `E`.
    pub fn num_experts(&self) -> usize {
        self.owner.len()
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The rank holding `expert`.
    pub fn owner(&self, expert: usize) -> Option<usize> {
        self.owner.get(expert).copied()
    }

    /// The global ids of `rank`'s experts, by local id.
    pub fn local_experts(&self, rank: usize) -> Vec<usize> {
        let mut experts: Vec<usize> = (0..self.num_experts())
            .filter(|&e| self.owner[e] == rank)
            .collect();
        experts.sort_by_key(|&e| self.local[e]);
        experts
    }

    /// `rank`'s expert map: each expert's local id there, or -1.
    pub fn expert_map(&self, rank: usize) -> Vec<i32> {
        (0..self.num_experts())
            .map(|e| {
                if self.owner[e] == rank {
                    self.local[e] as i32
                } else {
                    -1
                }
            })
            .collect()
    }

    /// The dispatch's map: each expert's rank, as the expert map of a permute that
    /// groups entries by destination (`L = W`).
    pub fn rank_map(&self) -> Vec<i32> {
        self.owner.iter().map(|&rank| rank as i32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_maps_round_trip() {
        let placement = ExpertPlacement::contiguous(8, 4).unwrap();
        let maps: Vec<_> = (0..4).map(|r| placement.expert_map(r)).collect();
        assert_eq!(maps[1], [-1, -1, 0, 1, -1, -1, -1, -1]);
        assert_eq!(ExpertPlacement::from_expert_maps(&maps).unwrap(), placement);
        assert_eq!(placement.local_experts(3), [6, 7]);
        assert_eq!(placement.rank_map(), [0, 0, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn explicit_maps_may_interleave_and_leave_a_rank_empty() {
        let maps = vec![vec![1, -1, 0, -1], vec![-1, 1, -1, 0], vec![-1; 4]];
        let placement = ExpertPlacement::from_expert_maps(&maps).unwrap();
        assert_eq!(placement.local_experts(0), [2, 0]);
        assert_eq!(placement.local_experts(1), [3, 1]);
        assert!(placement.local_experts(2).is_empty());
        assert_eq!(placement.rank_map(), [0, 1, 0, 1]);
    }

    #[test]
    fn refuses_what_is_not_a_placement() {
        let refused = |maps: Vec<Vec<i32>>| {
            ExpertPlacement::from_expert_maps(&maps)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(vec![vec![0, -1], vec![0, 1]]).contains("expert 0 is on two ranks"));
        assert!(refused(vec![vec![0, -1], vec![-1, -1]]).contains("expert 1 is on no rank"));
        assert!(refused(vec![vec![0, 0]]).contains("local id 0 to two experts"));
        assert!(refused(vec![vec![0, 2]]).contains("outside 0..2"));
        assert!(refused(vec![vec![0, -1], vec![-1]]).contains("has 1 entries"));
        assert!(ExpertPlacement::contiguous(6, 4).is_err());
    }
}

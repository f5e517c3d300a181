//! `#[repr(C)]` argument blocks shared by the kernels and the host launches.
//!
//! All counts are `u32`: the runtime validates every call first (`N*K` must fit in
//! `i32`, see `moe-runtime`'s scratch validation), so no value here can overflow.

/// The routing shape of one call: `N` tokens, each choosing `K` of `E` global experts,
/// of which `L` live on this rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoutingDims {
    /// `N`, tokens in this call.
    pub num_tokens: u32,
    /// `K`, experts chosen by each token.
    pub topk: u32,
    /// `E`, global experts: valid ids are `0..E`.
    pub num_experts: u32,
    /// `L`, experts on this rank: local ids are `0..L`.
    pub num_local_experts: u32,
}

impl RoutingDims {
    /// `N*K`: the number of `(token, choice)` entries, and the sentinel that marks a
    /// dropped entry in `permuted_idx` and `sorted_ids`.
    pub const fn num_entries(&self) -> u32 {
        self.num_tokens * self.topk
    }
}

/// How one row of hidden states is laid out in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowLayout {
    /// Bytes in one row: `H * size_of(dtype)`.
    pub row_bytes: u32,
    /// `S`, per-token scales (`f32`) that travel with each row; 0 when there are none.
    pub scale_columns: u32,
}

/// Parameters of the index-only `align` operation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AlignDims {
    /// Each expert's group is padded up to a multiple of this many rows.
    pub block_size: u32,
    /// Length of the `sorted_ids` view for this call: `N*K + min(L, N*K) * (block_size - 1)`.
    pub max_padded_rows: u32,
}

// Kernel arguments are copied byte for byte into the launch; pin their layout.
const _: () = {
    assert!(core::mem::size_of::<RoutingDims>() == 16);
    assert!(core::mem::align_of::<RoutingDims>() == 4);
    assert!(core::mem::size_of::<RowLayout>() == 8);
    assert!(core::mem::align_of::<RowLayout>() == 4);
    assert!(core::mem::size_of::<AlignDims>() == 8);
    assert!(core::mem::align_of::<AlignDims>() == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_entries_is_tokens_times_topk() {
        let dims = RoutingDims {
            num_tokens: 37,
            topk: 6,
            num_experts: 64,
            num_local_experts: 16,
        };
        assert_eq!(dims.num_entries(), 222);
    }
}

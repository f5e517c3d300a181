//! The names of the kernel entry points, spelled once for the host.
//!
//! The device side defines each name as an `extern "ptx-kernel"` function in
//! `device/mod.rs`; a host test checks that every name here is an entry of the
//! embedded PTX, so the two cannot drift apart.

/// Integer width of `topk_ids`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdWidth {
    I32,
    I64,
}

/// Bytes each thread of `permute_rows` moves per access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowVector {
    /// 16-byte vectors: rows and base addresses are multiples of 16 bytes.
    Bytes16,
    /// 4-byte words.
    Bytes4,
    /// Single bytes: any row.
    Bytes1,
}

impl RowVector {
    /// Bytes per access.
    pub const fn bytes(self) -> usize {
        match self {
            RowVector::Bytes16 => 16,
            RowVector::Bytes4 => 4,
            RowVector::Bytes1 => 1,
        }
    }

    /// The widest access that `row_bytes` and every base address allow.
    pub const fn for_layout(row_bytes: usize, address_bits: u64) -> Self {
        let alignment = row_bytes as u64 | address_bits;
        if alignment % 16 == 0 {
            RowVector::Bytes16
        } else if alignment % 4 == 0 {
            RowVector::Bytes4
        } else {
            RowVector::Bytes1
        }
    }
}

/// Element type of unpermute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Float {
    F32,
    F16,
    BF16,
}

/// `route_count_*`: per-chunk expert counts (multi-chunk calls only).
pub const fn route_count(align: bool, ids: IdWidth) -> &'static str {
    match (align, ids) {
        (false, IdWidth::I32) => "route_count_i32",
        (false, IdWidth::I64) => "route_count_i64",
        (true, IdWidth::I32) => "route_count_align_i32",
        (true, IdWidth::I64) => "route_count_align_i64",
    }
}

/// `route_scan*`: expert offsets and chunk first rows (multi-chunk calls only).
pub const fn route_scan(align: bool) -> &'static str {
    if align {
        "route_scan_align"
    } else {
        "route_scan"
    }
}

/// `route_place_*`: the stable placement of every entry.
pub const fn route_place(align: bool, ids: IdWidth) -> &'static str {
    match (align, ids) {
        (false, IdWidth::I32) => "route_place_i32",
        (false, IdWidth::I64) => "route_place_i64",
        (true, IdWidth::I32) => "route_place_align_i32",
        (true, IdWidth::I64) => "route_place_align_i64",
    }
}

/// `permute_rows_*`: the row scatter.
pub const fn permute_rows(vector: RowVector) -> &'static str {
    match vector {
        RowVector::Bytes16 => "permute_rows_v16",
        RowVector::Bytes4 => "permute_rows_v4",
        RowVector::Bytes1 => "permute_rows_v1",
    }
}

/// `unpermute_*`: the weighted combine; `vector` when rows allow 16-byte accesses.
pub const fn unpermute(float: Float, vector: bool) -> &'static str {
    match (float, vector) {
        (Float::F32, true) => "unpermute_f32_v16",
        (Float::F32, false) => "unpermute_f32_v1",
        (Float::F16, true) => "unpermute_f16_v16",
        (Float::F16, false) => "unpermute_f16_v1",
        (Float::BF16, true) => "unpermute_bf16_v16",
        (Float::BF16, false) => "unpermute_bf16_v1",
    }
}

/// `router_topk`: the MoE block's router.
pub const ROUTER_TOPK: &str = "router_topk";

/// `silu_mul_bf16`: the experts' activation.
pub const SILU_MUL_BF16: &str = "silu_mul_bf16";

/// Every entry point of the module.
pub const ALL: [&str; 21] = [
    route_count(false, IdWidth::I32),
    route_count(false, IdWidth::I64),
    route_count(true, IdWidth::I32),
    route_count(true, IdWidth::I64),
    route_scan(false),
    route_scan(true),
    route_place(false, IdWidth::I32),
    route_place(false, IdWidth::I64),
    route_place(true, IdWidth::I32),
    route_place(true, IdWidth::I64),
    permute_rows(RowVector::Bytes16),
    permute_rows(RowVector::Bytes4),
    permute_rows(RowVector::Bytes1),
    unpermute(Float::F32, true),
    unpermute(Float::F32, false),
    unpermute(Float::F16, true),
    unpermute(Float::F16, false),
    unpermute(Float::BF16, true),
    unpermute(Float::BF16, false),
    ROUTER_TOPK,
    SILU_MUL_BF16,
];

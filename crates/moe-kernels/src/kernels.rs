//! The kernel entry points, named once for the host.
//!
//! The device side defines each entry as an `extern "ptx-kernel"` function in
//! `device/mod.rs`; a host test checks that every [`Kernel::name`] is an entry of the
//! embedded PTX, so the two cannot drift apart. The host loads the module once per
//! context into a table indexed by [`Kernel::index`]: a launch never looks a name up.

use crate::params::ParamsKind;

/// Integer width of `topk_ids`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdWidth {
    /// `i32` ids.
    I32,
    /// `i64` ids (the index type of `torch.topk`).
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
    /// `f32`.
    F32,
    /// IEEE `f16`.
    F16,
    /// `bf16`.
    BF16,
}

macro_rules! kernels {
    ($($variant:ident => $name:literal, $params:ident;)*) => {
        /// One entry point of the PTX module.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Kernel {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl Kernel {
    /// Dynamic shared memory the kernel is launched with, in bytes.
    pub const fn dynamic_shared_bytes(self) -> u32 {
        match self {
            Kernel::GroupedGemmBf16 | Kernel::GroupedGemmSiluBf16 => crate::GEMM_SHARED_BYTES,
            _ => 0,
        }
    }
}

impl Kernel {
            /// Every entry point, in [`Kernel::index`] order.
            pub const ALL: [Kernel; [$($name),*].len()] = [$(Kernel::$variant),*];

            /// The entry point's name in the PTX.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Kernel::$variant => $name,)*
                }
            }

            /// The parameter block the entry point takes.
            pub const fn params(self) -> ParamsKind {
                match self {
                    $(Kernel::$variant => ParamsKind::$params,)*
                }
            }
        }
    };
}

kernels! {
    RouteCountI32 => "route_count_i32", Route;
    RouteCountI64 => "route_count_i64", Route;
    RouteCountAlignI32 => "route_count_align_i32", Route;
    RouteCountAlignI64 => "route_count_align_i64", Route;
    RouteScan => "route_scan", Route;
    RouteScanAlign => "route_scan_align", Route;
    RoutePlaceI32 => "route_place_i32", Route;
    RoutePlaceI64 => "route_place_i64", Route;
    RoutePlaceAlignI32 => "route_place_align_i32", Route;
    RoutePlaceAlignI64 => "route_place_align_i64", Route;
    PermuteRowsV16 => "permute_rows_v16", PermuteRows;
    PermuteRowsV4 => "permute_rows_v4", PermuteRows;
    PermuteRowsV1 => "permute_rows_v1", PermuteRows;
    UnpermuteF32V16 => "unpermute_f32_v16", Unpermute;
    UnpermuteF32V1 => "unpermute_f32_v1", Unpermute;
    UnpermuteF16V16 => "unpermute_f16_v16", Unpermute;
    UnpermuteF16V1 => "unpermute_f16_v1", Unpermute;
    UnpermuteBf16V16 => "unpermute_bf16_v16", Unpermute;
    UnpermuteBf16V1 => "unpermute_bf16_v1", Unpermute;
    RouterTopk => "router_topk", Router;
    SiluMulBf16 => "silu_mul_bf16", SiluMul;
    RouterGrouped => "router_grouped", GroupedRouter;
    AddBf16 => "add_bf16", Add;
    GroupedGemmBf16 => "grouped_gemm_bf16", GroupedGemm;
    GroupedGemmSiluBf16 => "grouped_gemm_silu_bf16", GroupedGemm;
    GemmReduceBf16 => "grouped_gemm_reduce_bf16", GemmReduce;
    GemmReduceSiluBf16 => "grouped_gemm_reduce_silu_bf16", GemmReduce;
    AlignInverse => "align_inverse", AlignInverse;
    GatherIds => "gather_ids", GatherIds;
    PermuteFusedI32 => "permute_fused_i32", PermuteFused;
    PermuteFusedI64 => "permute_fused_i64", PermuteFused;
    RoutePlaceScanI32 => "route_place_scan_i32", Route;
    RoutePlaceScanI64 => "route_place_scan_i64", Route;
    UnpermuteF32V16Small => "unpermute_f32_v16_small", Unpermute;
    UnpermuteF16V16Small => "unpermute_f16_v16_small", Unpermute;
    UnpermuteBf16V16Small => "unpermute_bf16_v16_small", Unpermute;
}

impl Kernel {
    /// The entry point's position in [`Kernel::ALL`]: the index of its function in a
    /// loaded module's table.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// `route_count_*`: per-chunk expert counts (multi-chunk calls only).
    pub const fn route_count(align: bool, ids: IdWidth) -> Kernel {
        match (align, ids) {
            (false, IdWidth::I32) => Kernel::RouteCountI32,
            (false, IdWidth::I64) => Kernel::RouteCountI64,
            (true, IdWidth::I32) => Kernel::RouteCountAlignI32,
            (true, IdWidth::I64) => Kernel::RouteCountAlignI64,
        }
    }

    /// `route_scan*`: expert offsets and chunk first rows (multi-chunk calls only).
    pub const fn route_scan(align: bool) -> Kernel {
        if align {
            Kernel::RouteScanAlign
        } else {
            Kernel::RouteScan
        }
    }

    /// `route_place_*`: the stable placement of every entry.
    pub const fn route_place(align: bool, ids: IdWidth) -> Kernel {
        match (align, ids) {
            (false, IdWidth::I32) => Kernel::RoutePlaceI32,
            (false, IdWidth::I64) => Kernel::RoutePlaceI64,
            (true, IdWidth::I32) => Kernel::RoutePlaceAlignI32,
            (true, IdWidth::I64) => Kernel::RoutePlaceAlignI64,
        }
    }

    /// `route_place_scan_*`: the placement of a permute's chunks, each block scanning
    /// the chunks' counts itself (after `route_count`, with no `route_scan`).
    pub const fn route_place_scan(ids: IdWidth) -> Kernel {
        match ids {
            IdWidth::I32 => Kernel::RoutePlaceScanI32,
            IdWidth::I64 => Kernel::RoutePlaceScanI64,
        }
    }

    /// `permute_rows_*`: the row scatter.
    pub const fn permute_rows(vector: RowVector) -> Kernel {
        match vector {
            RowVector::Bytes16 => Kernel::PermuteRowsV16,
            RowVector::Bytes4 => Kernel::PermuteRowsV4,
            RowVector::Bytes1 => Kernel::PermuteRowsV1,
        }
    }

    /// `unpermute_*`: the weighted combine; `vector` when rows allow 16-byte accesses,
    /// `small` where [`unpermute_reads_rows_at_once`] says so (every row of a token read
    /// at once; 16-byte rows only).
    ///
    /// [`unpermute_reads_rows_at_once`]: crate::unpermute_reads_rows_at_once
    pub const fn unpermute(float: Float, vector: bool, small: bool) -> Kernel {
        match (float, vector, small) {
            (Float::F32, true, true) => Kernel::UnpermuteF32V16Small,
            (Float::F16, true, true) => Kernel::UnpermuteF16V16Small,
            (Float::BF16, true, true) => Kernel::UnpermuteBf16V16Small,
            (float, vector, _) => Kernel::unpermute_one_row(float, vector),
        }
    }

    const fn unpermute_one_row(float: Float, vector: bool) -> Kernel {
        match (float, vector) {
            (Float::F32, true) => Kernel::UnpermuteF32V16,
            (Float::F32, false) => Kernel::UnpermuteF32V1,
            (Float::F16, true) => Kernel::UnpermuteF16V16,
            (Float::F16, false) => Kernel::UnpermuteF16V1,
            (Float::BF16, true) => Kernel::UnpermuteBf16V16,
            (Float::BF16, false) => Kernel::UnpermuteBf16V1,
        }
    }
}

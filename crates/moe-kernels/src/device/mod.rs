//! The kernels, compiled for `nvptx64-nvidia-cuda` only.
//!
//! Each `extern "ptx-kernel"` entry point is a thin, monomorphic wrapper over a
//! generic body in `route` or `rows`, named by [`crate::kernels`]; its one argument is
//! a `#[repr(C)]` block from [`crate::params`] passed by value. In the Hopper module
//! (`cfg(moe_sm90)`) every entry first waits for the grids before it
//! ([`intrinsics::wait_for_prior_grids`]), which lets the host launch it early.

/// Runs `$body` once for each `$j` in the list, each time with `$j` a constant. LLVM
/// leaves a loop rolled when its body is large (as a 16-bit row's sum is) or its trip
/// count unknown, and a rolled loop waits for each load before issuing the next, and
/// indexes its arrays at run time, which puts them in local memory; loops whose loads
/// must be in flight together (unpermute's rows, the routing's chunk counts) are
/// written with these instead.
macro_rules! unroll {
    ($j:ident in [$($n:literal)*] => $body:expr) => {
        $({
            let $j: usize = $n;
            $body
        })*
    };
}

/// [`unroll!`] over `0..8`.
macro_rules! unroll_8 {
    ($j:ident => $body:expr) => {
        unroll!($j in [0 1 2 3 4 5 6 7] => $body)
    };
}

/// [`unroll!`] over `0..16`.
macro_rules! unroll_16 {
    ($j:ident => $body:expr) => {
        unroll!($j in [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] => $body)
    };
}

mod block;
mod gemm;
mod intrinsics;
mod route;
mod rows;
mod status;

use crate::params::{
    AddParams, AlignInverseParams, GatherIdsParams, GemmReduceParams, GroupedGemmParams,
    GroupedRouterParams, PermuteFusedParams, PermuteRowsParams, RouteParams, RouterParams,
    SiluMulParams, UnpermuteParams,
};
use rows::{BF16, F16, F32, LOADS_LARGE as ONE, LOADS_SMALL as ALL, V16};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: aborts the kernel; the host sees a launch failure.
    unsafe { core::arch::nvptx::trap() }
}

/// Defines kernel entry points: `name(p: Params) => body using p`.
macro_rules! kernels {
    ($($name:ident($p:ident: $params:ty) => $body:expr;)*) => {$(
        /// # Safety
        /// Launched by `moe-runtime` with the grid and buffers its launch code sizes.
        #[allow(unreachable_pub)] // exported by name from the PTX module
        #[unsafe(no_mangle)]
        pub unsafe extern "ptx-kernel" fn $name($p: $params) {
            let $p = &$p;
            #[cfg(moe_sm90)]
            intrinsics::wait_for_prior_grids();
            // SAFETY: the host validated the call and sized every buffer of the params.
            unsafe { $body }
        }
    )*};
}

kernels! {
    route_count_i32(p: RouteParams) => route::route_count::<i32, false>(p);
    route_count_i64(p: RouteParams) => route::route_count::<i64, false>(p);
    route_count_align_i32(p: RouteParams) => route::route_count::<i32, true>(p);
    route_count_align_i64(p: RouteParams) => route::route_count::<i64, true>(p);
    route_scan(p: RouteParams) => route::route_scan(p, false);
    route_scan_align(p: RouteParams) => route::route_scan(p, true);
    route_place_i32(p: RouteParams) => route::route_place::<i32, false>(p);
    route_place_scan_i32(p: RouteParams) => route::route_place_scan::<i32>(p);
    route_place_scan_i64(p: RouteParams) => route::route_place_scan::<i64>(p);
    route_place_i64(p: RouteParams) => route::route_place::<i64, false>(p);
    route_place_align_i32(p: RouteParams) => route::route_place::<i32, true>(p);
    route_place_align_i64(p: RouteParams) => route::route_place::<i64, true>(p);
    permute_rows_v16(p: PermuteRowsParams) => rows::permute_rows::<V16>(p);
    permute_rows_v4(p: PermuteRowsParams) => rows::permute_rows::<u32>(p);
    permute_rows_v1(p: PermuteRowsParams) => rows::permute_rows::<u8>(p);
    unpermute_f32_v16(p: UnpermuteParams) => rows::unpermute::<F32, 4, true, ONE>(p);
    unpermute_f32_v1(p: UnpermuteParams) => rows::unpermute::<F32, 1, false, ONE>(p);
    unpermute_f16_v16(p: UnpermuteParams) => rows::unpermute::<F16, 8, true, ONE>(p);
    unpermute_f16_v1(p: UnpermuteParams) => rows::unpermute::<F16, 1, false, ONE>(p);
    unpermute_bf16_v16(p: UnpermuteParams) => rows::unpermute::<BF16, 8, true, ONE>(p);
    unpermute_bf16_v1(p: UnpermuteParams) => rows::unpermute::<BF16, 1, false, ONE>(p);
    unpermute_f32_v16_small(p: UnpermuteParams) => rows::unpermute::<F32, 4, true, ALL>(p);
    unpermute_f16_v16_small(p: UnpermuteParams) => rows::unpermute::<F16, 8, true, ALL>(p);
    unpermute_bf16_v16_small(p: UnpermuteParams) => rows::unpermute::<BF16, 8, true, ALL>(p);
    router_topk(p: RouterParams) => block::router_topk(p);
    silu_mul_bf16(p: SiluMulParams) => block::silu_mul_bf16(p);
    router_grouped(p: GroupedRouterParams) => block::router_grouped(p);
    add_bf16(p: AddParams) => block::add_bf16(p);
    grouped_gemm_bf16(p: GroupedGemmParams) => gemm::grouped_gemm_bf16::<false>(p);
    grouped_gemm_silu_bf16(p: GroupedGemmParams) => gemm::grouped_gemm_bf16::<true>(p);
    grouped_gemm_reduce_bf16(p: GemmReduceParams) => gemm::reduce_bf16::<false>(p);
    grouped_gemm_reduce_silu_bf16(p: GemmReduceParams) => gemm::reduce_bf16::<true>(p);
    align_inverse(p: AlignInverseParams) => block::align_inverse(p);
    gather_ids(p: GatherIdsParams) => block::gather_ids(p);
    permute_fused_i32(p: PermuteFusedParams) => rows::permute_fused::<i32>(p);
    permute_fused_i64(p: PermuteFusedParams) => rows::permute_fused::<i64>(p);
}

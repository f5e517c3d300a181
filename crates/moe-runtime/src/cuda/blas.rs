//! Dense GEMMs through cuBLAS (loaded at run time, like the driver), for the expert
//! backends: `C = A * B^T` with bf16 `A` and `B` and f32 accumulation.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result, sys};
use half::bf16;

use super::device::CudaDevice;
use super::memory::{DeviceView, DeviceViewMut};
use crate::{MoeError, Result};

/// An element type a GEMM can write.
pub trait GemmOutput: cudarc::driver::DeviceRepr {
    #[doc(hidden)]
    const CUDA_TYPE: sys::cudaDataType_t;
}

impl GemmOutput for bf16 {
    const CUDA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_16BF;
}

impl GemmOutput for f32 {
    const CUDA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_32F;
}

/// A cuBLAS handle on a device's stream.
#[derive(Debug)]
pub struct Blas {
    device: Arc<CudaDevice>,
    blas: CudaBlas,
}

fn blas_error(error: result::CublasError) -> MoeError {
    MoeError::Driver {
        action: "run a cuBLAS GEMM",
        error: format!("{error:?}"),
    }
}

impl Blas {
    /// A handle queuing its work on `device`'s stream.
    pub fn new(device: Arc<CudaDevice>) -> Result<Self> {
        let blas = CudaBlas::new(device.stream().clone()).map_err(|error| {
            MoeError::DeviceUnavailable {
                device: device.device(),
                reason: format!("cuBLAS could not be loaded: {error:?}"),
            }
        })?;
        Ok(Self { device, blas })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// `c [m, n] = a [m, k] * b [n, k]^T`, all row-major (`b` as `nn.Linear` stores
    /// a weight), bf16 inputs, f32 accumulation, `c` in bf16 or f32.
    pub fn matmul_nt<O: GemmOutput>(
        &self,
        (m, n, k): (usize, usize, usize),
        a: DeviceView<'_, bf16>,
        b: DeviceView<'_, bf16>,
        c: DeviceViewMut<'_, O>,
    ) -> Result<()> {
        for (tensor, len, want) in [
            ("a", a.len(), m * k),
            ("b", b.len(), n * k),
            ("c", c.len(), m * n),
        ] {
            if len < want {
                return Err(MoeError::Shape {
                    tensor,
                    len,
                    expected: format!(
                        "at least {want} elements for a ({m} x {k}) * ({n} x {k})^T GEMM"
                    ),
                });
            }
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let too_big = [m, n, k].iter().any(|&d| d > i32::MAX as usize);
        if too_big {
            return Err(MoeError::Shape {
                tensor: "a",
                len: m * k,
                expected: "GEMM dimensions within i32".into(),
            });
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Row-major C = A B^T is column-major C^T = B A^T: cuBLAS multiplies the
        // column-major (k x n) view of `b`, transposed, by the (k x m) view of `a`.
        // SAFETY: the three buffers hold at least the elements checked above on this
        // handle's device; the scalars are f32 as CUBLAS_COMPUTE_32F requires.
        unsafe {
            result::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                b.address() as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                k as i32,
                a.address() as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                k as i32,
                (&beta) as *const f32 as *const _,
                c.address() as *mut _,
                O::CUDA_TYPE,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_error)
    }
}

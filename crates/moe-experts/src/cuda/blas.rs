//! Dense GEMMs through cuBLAS (loaded at run time, like the driver), for the expert
//! backends: `C = A * B^T` with bf16 `A` and `B` and f32 accumulation, on the stream
//! each call is given.

use std::sync::Arc;

use half::bf16;
use moe_runtime::cuda::cudarc::cublas::{result, sys};
use moe_runtime::cuda::{CudaDevice, CudaLibrary, DeviceRepr, DeviceView, DeviceViewMut, Stream};

use crate::{ExpertsError, Result};

/// An element type a GEMM can write.
pub trait GemmOutput: DeviceRepr {
    #[doc(hidden)]
    const CUDA_TYPE: sys::cudaDataType_t;
}

impl GemmOutput for bf16 {
    const CUDA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_16BF;
}

impl GemmOutput for f32 {
    const CUDA_TYPE: sys::cudaDataType_t = sys::cudaDataType_t::CUDA_R_32F;
}

/// A cuBLAS handle of a device's context; each GEMM runs on the stream it is given.
#[derive(Debug)]
pub struct Blas {
    device: Arc<CudaDevice>,
    handle: sys::cublasHandle_t,
}

// SAFETY: a cuBLAS handle may be used from any thread, one call at a time, which
// `&mut self` on every call guarantees.
unsafe impl Send for Blas {}

impl Blas {
    /// A handle on `device`. [`ExpertsError::BlasUnavailable`] where cuBLAS cannot be
    /// loaded.
    pub fn new(device: Arc<CudaDevice>) -> Result<Self> {
        if !CudaLibrary::Cublas.is_present() {
            return Err(ExpertsError::BlasUnavailable {
                device: device.device(),
                reason: "libcublas was not found".into(),
            });
        }
        super::kernels::bind(&device)?;
        let handle = result::create_handle().map_err(|source| ExpertsError::Blas {
            action: "create a cuBLAS handle",
            source,
        })?;
        Ok(Self { device, handle })
    }

    /// The device whose context the handle belongs to.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// `c [m, n] = a [m, k] * b [n, k]^T`, all row-major (`b` as `nn.Linear` stores
    /// a weight), bf16 inputs, f32 accumulation, `c` in bf16 or f32, on `stream`.
    ///
    /// The views must be usable on `stream` (the runtime's binding rule); cuBLAS
    /// reads and writes them there.
    pub fn matmul_nt<O: GemmOutput>(
        &mut self,
        stream: &Stream<'_>,
        (m, n, k): (usize, usize, usize),
        a: DeviceView<'_, bf16>,
        b: DeviceView<'_, bf16>,
        c: DeviceViewMut<'_, O>,
    ) -> Result<()> {
        let gemm = format!("a ({m} x {k}) * ({n} x {k})^T GEMM");
        let sizes = [
            ("a", a.len(), m.checked_mul(k)),
            ("b", b.len(), n.checked_mul(k)),
        ];
        let sizes = sizes.into_iter().chain([("c", c.len(), m.checked_mul(n))]);
        for (tensor, len, want) in sizes {
            if want.is_none_or(|want| len < want) {
                return Err(ExpertsError::Shape {
                    tensor,
                    len,
                    expected: format!("enough elements for {gemm}"),
                });
            }
        }
        super::kernels::check_streams(
            stream,
            &[("a", a.stream()), ("b", b.stream()), ("c", c.stream())],
        )?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (Ok(m), Ok(n), Ok(k)) = (i32::try_from(m), i32::try_from(n), i32::try_from(k)) else {
            return Err(ExpertsError::Shape {
                tensor: "GEMM dimensions",
                len: m.max(n).max(k),
                expected: format!("m, n and k within i32 (cuBLAS's index type) for {gemm}"),
            });
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the handle is this context's; the stream is a valid stream of it
        // (the Stream constructors' contract). Row-major C = A B^T is column-major
        // C^T = B A^T: cuBLAS multiplies the column-major (k x n) view of `b`,
        // transposed, by the (k x m) view of `a`. The three buffers hold at least the
        // elements checked above and are usable on `stream`; the scalars are f32 as
        // CUBLAS_COMPUTE_32F requires.
        unsafe {
            result::set_stream(self.handle, stream.cu_stream() as _).map_err(|source| {
                ExpertsError::Blas {
                    action: "set the cuBLAS stream",
                    source,
                }
            })?;
            result::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                b.address() as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                k,
                a.address() as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                c.address() as *mut _,
                O::CUDA_TYPE,
                n,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|source| ExpertsError::Blas {
            action: "run a GEMM",
            source,
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let context = self.device.context();
        context.record_err(context.bind_to_thread());
        // SAFETY: the handle was created by `new` and is destroyed once. A failure
        // has nowhere to go in a drop; cuBLAS reports none for a valid handle.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

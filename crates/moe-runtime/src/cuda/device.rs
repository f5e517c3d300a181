//! A CUDA device: a context and the project's kernels, loaded once per context; and
//! [`Stream`], the stream one call runs on.
//!
//! A device owns no stream. Every operation takes the stream it runs on, because the
//! callers own their streams: PyTorch captures graphs on a side stream and switches
//! streams, candle keeps one per device, a serving stack overlaps two micro-batches on
//! two streams.

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError, sys};
use cudarc::nvrtc::Ptx;
use moe_kernels::KernelModule;
use moe_kernels::kernels::Kernel;

use crate::{Device, MoeError, Result};

/// A CUDA context with the project's kernels loaded.
///
/// Cheap to share (`Arc`). Scratches built on it use its kernel table; the work of a
/// call goes to the [`Stream`] the call is given.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
    context: Arc<CudaContext>,
    kernels: Arc<KernelTable>,
}

/// The functions of the PTX module, indexed by [`Kernel::index`].
#[derive(Debug)]
struct KernelTable {
    module: KernelModule,
    _loaded: Arc<CudaModule>,
    functions: Box<[CudaFunction]>,
}

/// The loaded modules, one per context and module: a context loads the PTX once
/// however many devices or scratches use it.
static MODULES: Mutex<Vec<(usize, KernelModule, Weak<KernelTable>)>> = Mutex::new(Vec::new());

/// The environment variable that chooses the PTX module (`sm_80`, `sm_90`) instead of
/// the newest one the device runs: `MOE_KERNEL_MODULE=sm_80` turns the Hopper
/// module's overlapped launches off, to compare or to rule them out.
pub const KERNEL_MODULE_ENV: &str = "MOE_KERNEL_MODULE";

/// The driver error of `action`, as a typed error with its cause.
pub(crate) fn driver_error(action: &'static str) -> impl Fn(DriverError) -> MoeError {
    move |source| MoeError::Driver { action, source }
}

/// A CUDA library the workspace uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaLibrary {
    /// The driver, `libcuda`.
    Driver,
    /// cuBLAS (the MoE block's GEMMs).
    Cublas,
}

impl CudaLibrary {
    /// Whether the library can be used. With feature `dynamic-loading` (the default)
    /// libraries are loaded when the program runs, and calling into an absent one
    /// panics: ask first, and report an error instead. Linked at build time
    /// (`dynamic-linking`), the program would not have started without it.
    pub fn is_present(self) -> bool {
        #[cfg(feature = "dynamic-loading")]
        {
            // SAFETY: only tries to open the library by name.
            unsafe {
                match self {
                    CudaLibrary::Driver => sys::is_culib_present(),
                    CudaLibrary::Cublas => cudarc::cublas::sys::is_culib_present(),
                }
            }
        }
        #[cfg(not(feature = "dynamic-loading"))]
        {
            true
        }
    }
}

impl CudaDevice {
    /// Opens CUDA device `ordinal` (its primary context, which candle and PyTorch
    /// share) and loads the kernels into it.
    ///
    /// Fails with [`MoeError::DeviceUnavailable`] where there is no driver or no such
    /// device: the caller can fall back to the CPU.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let device = Device::Cuda(ordinal);
        let count = Self::count().map_err(|error| match error {
            MoeError::DeviceUnavailable { reason, .. } => {
                MoeError::DeviceUnavailable { device, reason }
            }
            other => other,
        })?;
        if ordinal >= count {
            return Err(MoeError::DeviceUnavailable {
                device,
                reason: format!("the driver reports {count} CUDA device(s)"),
            });
        }
        let context = CudaContext::new(ordinal).map_err(driver_error("create a CUDA context"))?;
        Self::from_context(context)
    }

    /// The kernels in a context the caller already has (candle's device's, say).
    /// cudarc's settings of the context (event tracking) are left as they are.
    ///
    /// The PTX module is the newest the device runs ([`KernelModule::for_compute_capability`]),
    /// or the one named by `MOE_KERNEL_MODULE` ([`KERNEL_MODULE_ENV`]); a device older
    /// than compute capability 8.0, or a module it cannot run, is
    /// [`MoeError::DeviceUnavailable`].
    pub fn from_context(context: Arc<CudaContext>) -> Result<Arc<Self>> {
        let module = choose_module(&context, std::env::var(KERNEL_MODULE_ENV).ok().as_deref())?;
        let kernels = load_kernels(&context, module)?;
        Ok(Arc::new(Self {
            ordinal: context.ordinal(),
            context,
            kernels,
        }))
    }

    /// CUDA devices the driver reports; [`MoeError::DeviceUnavailable`] where no
    /// driver can be loaded.
    pub fn count() -> Result<usize> {
        if !CudaLibrary::Driver.is_present() {
            return Err(MoeError::DeviceUnavailable {
                device: Device::Cuda(0),
                reason: "no NVIDIA driver (libcuda.so) was found".into(),
            });
        }
        let count = CudaContext::device_count().map_err(driver_error("count CUDA devices"))?;
        Ok(count.max(0) as usize)
    }

    /// The driver's CUDA version, as `(major, minor)`.
    pub fn driver_version() -> Result<(i32, i32)> {
        Self::count()?;
        let mut version = 0;
        // SAFETY: the driver library is loaded (checked by `count`); the call writes
        // one integer.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver_error("read the driver version"))?;
        Ok((version / 1000, (version % 1000) / 10))
    }

    /// The device's ordinal, as the driver numbers devices.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device, as [`Device::Cuda`].
    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// The context the kernels are loaded in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// The card's name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.context
            .name()
            .map_err(driver_error("read the device name"))
    }

    /// A new stream of this device's context (cudarc's non-blocking stream).
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        self.context
            .new_stream()
            .map_err(driver_error("create a CUDA stream"))
    }

    /// `stream`, for calls on this device: an error when it belongs to another
    /// context.
    pub fn stream<'a>(&'a self, stream: &'a CudaStream) -> Result<Stream<'a>> {
        if stream.context().cu_ctx() != self.context.cu_ctx() {
            return Err(MoeError::ForeignStream {
                device: self.device(),
                stream_device: Device::Cuda(stream.context().ordinal()),
            });
        }
        Ok(Stream {
            device: self,
            raw: stream.cu_stream(),
        })
    }

    /// A stream the caller knows only by its handle (PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`, say), for calls on this device.
    ///
    /// # Safety
    /// `raw` is the null (legacy default) stream, the per-thread default stream, or a
    /// stream created in this device's context, and it is not destroyed while any call
    /// given the returned [`Stream`] can still queue work on it, nor while a
    /// [`PermuteScratch`](crate::PermuteScratch) stays bound to it.
    pub unsafe fn raw_stream(&self, raw: sys::CUstream) -> Stream<'_> {
        Stream { device: self, raw }
    }

    /// The loaded function of `kernel`.
    pub(crate) fn function(&self, kernel: Kernel) -> &CudaFunction {
        &self.kernels.functions[kernel.index()]
    }

    /// The PTX module the device's kernels come from.
    pub fn kernel_module(&self) -> KernelModule {
        self.kernels.module
    }

    /// Makes the context current on the calling thread (launches need it).
    pub(crate) fn bind_to_thread(&self) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(driver_error("make the CUDA context current"))
    }

    /// Whether `other` is this device's context.
    pub(crate) fn same_context(&self, other: &CudaDevice) -> bool {
        self.context.cu_ctx() == other.context.cu_ctx()
    }
}

/// The identity of a stream: its driver handle. Views and scratches remember the
/// stream they are bound to by it; errors show it in hex.
pub type StreamId = usize;

/// The stream one call runs on, with the device whose kernels it launches.
///
/// Borrowed for the call: made from a cudarc [`CudaStream`] by
/// [`CudaDevice::stream`] (checked to be of the device's context), or from a raw
/// handle by [`CudaDevice::raw_stream`] (`unsafe`). Copying it costs nothing; every
/// operation takes one, so the same scratch, device and kernels serve any stream.
#[derive(Clone, Copy, Debug)]
pub struct Stream<'a> {
    device: &'a CudaDevice,
    raw: sys::CUstream,
}

impl<'a> Stream<'a> {
    /// The device whose kernels calls on this stream launch.
    pub fn device(&self) -> &'a CudaDevice {
        self.device
    }

    /// The driver handle.
    pub fn cu_stream(&self) -> sys::CUstream {
        self.raw
    }

    /// The stream's identity (its handle as an integer).
    pub fn id(&self) -> StreamId {
        self.raw as StreamId
    }

    /// Waits on the host until everything queued on the stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind_to_thread()?;
        // SAFETY: a valid stream of the device's context (the constructors' contract).
        unsafe { cudarc::driver::result::stream::synchronize(self.raw) }
            .map_err(driver_error("synchronize the stream"))
    }

    /// Whether the stream is capturing a CUDA graph now (then nothing may wait for it).
    pub fn is_capturing(&self) -> Result<bool> {
        // SAFETY: a valid stream (the constructors' contract).
        let status = unsafe { cudarc::driver::result::stream::is_capturing(self.raw) }
            .map_err(driver_error("ask whether the stream is capturing"))?;
        Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }
}

/// The module for `context`'s device: the one `requested` names (the environment's
/// choice), else the newest the device runs.
fn choose_module(context: &CudaContext, requested: Option<&str>) -> Result<KernelModule> {
    let (major, minor) = context
        .compute_capability()
        .map_err(driver_error("read the device's compute capability"))?;
    module_for(
        Device::Cuda(context.ordinal()),
        (major.max(0) as u32, minor.max(0) as u32),
        requested,
    )
}

/// [`choose_module`] for a device of compute capability `major.minor`.
fn module_for(
    device: Device,
    (major, minor): (u32, u32),
    requested: Option<&str>,
) -> Result<KernelModule> {
    let unavailable = |reason| Err(MoeError::DeviceUnavailable { device, reason });
    let Some(newest) = KernelModule::for_compute_capability(major, minor) else {
        return unavailable(format!(
            "compute capability {major}.{minor}: the kernels need 8.0 (Ampere) or newer"
        ));
    };
    let Some(requested) = requested else {
        return Ok(newest);
    };
    let Some(module) = KernelModule::from_name(requested.trim()) else {
        let names: Vec<_> = KernelModule::ALL.iter().map(|m| m.name()).collect();
        return unavailable(format!(
            "{KERNEL_MODULE_ENV}={requested:?} names no kernel module (there are {})",
            names.join(", ")
        ));
    };
    let (need_major, need_minor) = module.min_compute_capability();
    if (need_major, need_minor) > (major, minor) {
        return unavailable(format!(
            "{KERNEL_MODULE_ENV}={} needs compute capability {need_major}.{need_minor}; the \
             device has {major}.{minor}",
            module.name()
        ));
    }
    Ok(module)
}

fn load_kernels(context: &Arc<CudaContext>, choice: KernelModule) -> Result<Arc<KernelTable>> {
    let key = context.cu_ctx() as usize;
    let mut modules = MODULES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    modules.retain(|(_, _, kernels)| kernels.strong_count() > 0);
    if let Some(kernels) = modules
        .iter()
        .find(|(ctx, module, _)| *ctx == key && *module == choice)
        .and_then(|(_, _, kernels)| kernels.upgrade())
    {
        return Ok(kernels);
    }
    let module = context
        .load_module(Ptx::from_src(choice.ptx()))
        .map_err(driver_error("load the kernels' PTX module"))?;
    let functions = Kernel::ALL
        .iter()
        .map(|kernel| module.load_function(kernel.name()))
        .collect::<Result<Box<[_]>, _>>()
        .map_err(driver_error("find a kernel in the PTX module"))?;
    // Kernels with more dynamic shared memory than a launch gets by default ask for it
    // once, here.
    for (kernel, function) in Kernel::ALL.iter().zip(&functions) {
        let bytes = kernel.dynamic_shared_bytes();
        if bytes > 48 * 1024 {
            function
                .set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(driver_error("raise a kernel's dynamic shared memory limit"))?;
        }
    }
    let kernels = Arc::new(KernelTable {
        module: choice,
        _loaded: module,
        functions,
    });
    modules.push((key, choice, Arc::downgrade(&kernels)));
    Ok(kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_loads_the_newest_module_it_runs_or_the_one_asked_for() {
        let device = Device::Cuda(0);
        let module = |cc, requested| module_for(device, cc, requested);
        assert_eq!(module((9, 0), None).unwrap(), KernelModule::Sm90);
        assert_eq!(module((8, 6), None).unwrap(), KernelModule::Sm80);
        assert_eq!(module((9, 0), Some("sm_80")).unwrap(), KernelModule::Sm80);
        assert_eq!(
            module((10, 0), Some(" sm_90\n")).unwrap(),
            KernelModule::Sm90
        );
        let reason = |result: Result<KernelModule>| match result {
            Err(MoeError::DeviceUnavailable { reason, .. }) => reason,
            other => panic!("expected DeviceUnavailable, got {other:?}"),
        };
        assert_eq!(
            reason(module((7, 5), None)),
            "compute capability 7.5: the kernels need 8.0 (Ampere) or newer"
        );
        assert_eq!(
            reason(module((8, 0), Some("sm_90"))),
            "MOE_KERNEL_MODULE=sm_90 needs compute capability 9.0; the device has 8.0"
        );
        assert_eq!(
            reason(module((9, 0), Some("hopper"))),
            "MOE_KERNEL_MODULE=\"hopper\" names no kernel module (there are sm_80, sm_90)"
        );
    }
}

//! A CUDA device: a context, the stream calls run on, and the project's kernels,
//! loaded from the embedded PTX once per context.

use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use moe_kernels::kernels;

use crate::{Device, MoeError, Result};

/// A CUDA device and the stream the runtime's work for it is queued on.
///
/// Cheap to share (`Arc`); every scratch built on it, and every call with such a
/// scratch, runs on its stream in order, so calls never wait for the host.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
}

/// The functions of the PTX module, in the order of `moe_kernels::kernels::ALL`.
#[derive(Debug)]
struct Kernels {
    _module: Arc<CudaModule>,
    functions: Vec<CudaFunction>,
}

/// The loaded modules, one per context: a context loads the PTX once however many
/// devices or scratches use it.
static MODULES: Mutex<Vec<(usize, Weak<Kernels>)>> = Mutex::new(Vec::new());

pub(crate) fn driver_error(action: &'static str) -> impl Fn(DriverError) -> MoeError {
    move |error| MoeError::Driver {
        action,
        error: error.to_string(),
    }
}

impl CudaDevice {
    /// Opens CUDA device `ordinal` (its primary context) with a new stream.
    ///
    /// Fails with [`MoeError::DeviceUnavailable`] where there is no driver or no such
    /// device: the caller can fall back to the CPU.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        let count = Self::count()?;
        if ordinal >= count {
            return Err(MoeError::DeviceUnavailable {
                device: Device::Cuda(ordinal),
                reason: format!("the driver reports {count} CUDA device(s)"),
            });
        }
        let context = CudaContext::new(ordinal).map_err(driver_error("create a CUDA context"))?;
        // Every launch of the runtime goes to one stream and names its buffers by raw
        // address, so cudarc's per-buffer event tracking would guard nothing; with it
        // off, no call records or waits on events, which graph capture requires.
        // SAFETY: no work has been queued in this context by this runtime yet, and the
        // runtime never relies on cudarc's events for ordering.
        unsafe { context.disable_event_tracking() };
        let stream = context
            .new_stream()
            .map_err(driver_error("create a CUDA stream"))?;
        Self::with_stream(stream)
    }

    /// Runs the runtime's work on a stream the caller already owns (a serving stack's
    /// own stream, wrapped by `CudaContext::wrap_borrowed_stream` or created with
    /// cudarc). The context's event tracking is left as the caller set it.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Arc<Self>> {
        let context = stream.context().clone();
        let kernels = load_kernels(&context)?;
        Ok(Arc::new(Self {
            ordinal: context.ordinal(),
            stream,
            kernels,
        }))
    }

    /// CUDA devices the driver reports; an error where no driver can be loaded.
    pub fn count() -> Result<usize> {
        // SAFETY: only tries to open the driver library by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
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
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(driver_error("read the driver version"))?;
        Ok((version / 1000, (version % 1000) / 10))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    /// The card's name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.stream
            .context()
            .name()
            .map_err(driver_error("read the device name"))
    }

    /// The stream every call on this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits until every queued call has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_error("synchronize the stream"))
    }

    /// The loaded function `name`, one of `moe_kernels::kernels::ALL`.
    pub(crate) fn function(&self, name: &str) -> &CudaFunction {
        let index = kernels::ALL
            .iter()
            .position(|&known| known == name)
            .expect("kernel names come from moe_kernels::kernels");
        &self.kernels.functions[index]
    }
}

fn load_kernels(context: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    let key = context.cu_ctx() as usize;
    let mut modules = MODULES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    modules.retain(|(_, kernels)| kernels.strong_count() > 0);
    if let Some(kernels) = modules
        .iter()
        .find(|(ctx, _)| *ctx == key)
        .and_then(|(_, kernels)| kernels.upgrade())
    {
        return Ok(kernels);
    }
    let module = context
        .load_module(Ptx::from_src(moe_kernels::PTX))
        .map_err(driver_error("load the kernels' PTX module"))?;
    let functions = kernels::ALL
        .iter()
        .map(|name| module.load_function(name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(driver_error("find a kernel in the PTX module"))?;
    let kernels = Arc::new(Kernels {
        _module: module,
        functions,
    });
    modules.push((key, Arc::downgrade(&kernels)));
    Ok(kernels)
}

//! `moe info`: what this binary and this machine have.

use moe_runtime::Device;
use moe_runtime::cuda::CudaDevice;

pub(crate) fn run() -> anyhow::Result<()> {
    println!(
        "moe {} ({} build)",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let manifest: serde_json::Value = serde_json::from_str(moe_kernels::PTX_MANIFEST)?;
    let compiler = manifest["compiler"]
        .as_str()
        .and_then(|c| c.lines().next())
        .unwrap_or("?");
    println!(
        "PTX: {} kernels for {}, built by {compiler}; kernel sources sha256 {}",
        moe_kernels::kernels::Kernel::ALL.len(),
        manifest["target"].as_str().unwrap_or("?"),
        manifest["sources_sha256"].as_str().unwrap_or("?"),
    );
    for module in manifest["modules"].as_array().into_iter().flatten() {
        println!(
            "  {}: {} (PTX ISA {}), sha256 {}",
            module["file"].as_str().unwrap_or("?"),
            module["target_cpu"].as_str().unwrap_or("?"),
            module["ptx_isa"].as_str().unwrap_or("?"),
            module["ptx_sha256"].as_str().unwrap_or("?"),
        );
    }
    println!("CPU: {} threads (rayon)", rayon::current_num_threads());
    match CudaDevice::count() {
        Ok(0) => println!("CUDA: the driver reports no device"),
        Ok(count) => {
            let (major, minor) = CudaDevice::driver_version().unwrap_or((0, 0));
            println!("CUDA: driver API {major}.{minor}, {count} device(s)");
            for ordinal in 0..count {
                match CudaDevice::new(ordinal) {
                    Ok(device) => {
                        let name = device.name().unwrap_or_else(|e| e.to_string());
                        let memory = device
                            .context()
                            .total_mem()
                            .map(|b| format!("{} MiB", b >> 20))
                            .unwrap_or_default();
                        let (cc_major, cc_minor) =
                            device.context().compute_capability().unwrap_or((0, 0));
                        let module = device.kernel_module();
                        let launches = if module.overlaps_launches() {
                            "launches overlapped"
                        } else {
                            "launches in turn"
                        };
                        println!(
                            "  cuda:{ordinal}: {name}, {memory}, compute capability {cc_major}.{cc_minor}, kernels loaded ({} module, {launches})",
                            module.name()
                        );
                    }
                    Err(error) => println!("  cuda:{ordinal}: {error}"),
                }
            }
        }
        Err(error) => println!("CUDA: {error}"),
    }
    let (device, reason) = Device::best_available();
    match reason {
        None => println!("best device: {device}"),
        Some(reason) => println!("best device: {device} ({reason})"),
    }
    Ok(())
}

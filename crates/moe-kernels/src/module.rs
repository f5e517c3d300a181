//! The PTX modules: the same kernels, compiled for two architectures.

/// One of the PTX modules `cargo xtask build-ptx` generates: every kernel of
/// [`Kernel::ALL`](crate::kernels::Kernel::ALL), under the same names, compiled for
/// one architecture. A device loads the newest module it runs
/// ([`for_compute_capability`](Self::for_compute_capability)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelModule {
    /// sm_80 and newer (PTX ISA 7.8): Ampere and Ada, and the fallback everywhere.
    Sm80,
    /// sm_90 and newer (PTX ISA 8.0): Hopper and later. Every kernel first waits for
    /// the grids queued before it (`griddepcontrol.wait`), so the host may launch it
    /// with programmatic stream serialization: its launch then overlaps the end of the
    /// kernel before it ([`overlaps_launches`](Self::overlaps_launches)).
    Sm90,
}

impl KernelModule {
    /// Every module, oldest architecture first.
    pub const ALL: [KernelModule; 2] = [KernelModule::Sm80, KernelModule::Sm90];

    /// The architecture's name, as `cargo xtask build-ptx` and `MOE_KERNEL_MODULE`
    /// spell it: `sm_80`, `sm_90`.
    pub const fn name(self) -> &'static str {
        match self {
            KernelModule::Sm80 => "sm_80",
            KernelModule::Sm90 => "sm_90",
        }
    }

    /// The oldest compute capability that runs the module.
    pub const fn min_compute_capability(self) -> (u32, u32) {
        match self {
            KernelModule::Sm80 => (8, 0),
            KernelModule::Sm90 => (9, 0),
        }
    }

    /// Whether the module's kernels wait for the grids before them, so that a launch
    /// may overlap its predecessor (programmatic dependent launch). Launching a
    /// module that does not wait that way would let a kernel read its predecessor's
    /// output before it is written.
    pub const fn overlaps_launches(self) -> bool {
        matches!(self, KernelModule::Sm90)
    }

    /// The newest module a device of compute capability `major.minor` runs; `None`
    /// below 8.0, which no module supports.
    pub const fn for_compute_capability(major: u32, minor: u32) -> Option<KernelModule> {
        if major >= 9 {
            Some(KernelModule::Sm90)
        } else if major == 8 {
            // Every 8.x runs sm_80 code; `minor` only matters to the next module.
            let _ = minor;
            Some(KernelModule::Sm80)
        } else {
            None
        }
    }

    /// The module named `name` (`sm_80`, `sm_90`).
    pub fn from_name(name: &str) -> Option<KernelModule> {
        KernelModule::ALL
            .into_iter()
            .find(|module| module.name() == name)
    }

    /// The module's PTX, embedded from `kernels-gpu/`.
    #[cfg(not(target_arch = "nvptx64"))]
    pub const fn ptx(self) -> &'static str {
        match self {
            KernelModule::Sm80 => crate::PTX,
            KernelModule::Sm90 => crate::PTX_SM90,
        }
    }
}

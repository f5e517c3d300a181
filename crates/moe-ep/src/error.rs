//! What can go wrong in expert parallelism, as one typed error.

use moe_experts::ExpertsError;
use moe_runtime::MoeError;

/// The crate's result.
pub type Result<T, E = EpError> = std::result::Result<T, E>;

/// An expert-parallel call or setup that failed. Errors that come from what another
/// rank was given (ranks disagreeing on the model, a placement two ranks claim) are
/// seen by every rank alike: each rank returns the same error, none waits forever.
#[derive(Debug, thiserror::Error)]
pub enum EpError {
    /// The NCCL library could not be loaded.
    #[error(
        "NCCL is not loadable: moe-ep loads it at run time under the names {searched:?}; \
         put a directory holding libnccl.so (a link to libnccl.so.2 will do) on \
         LD_LIBRARY_PATH"
    )]
    NcclNotFound {
        /// The file names looked for.
        searched: Vec<String>,
    },
    /// The loaded NCCL is older than the one the bindings were built for.
    #[error(
        "the loaded NCCL is {loaded}, older than {built}, the version moe-ep's bindings were \
         built for (cudarc's nccl-02028); load NCCL {built} or newer"
    )]
    NcclTooOld {
        /// The loaded version, as `major.minor.patch`.
        loaded: String,
        /// The version built for.
        built: String,
    },
    /// An NCCL call failed.
    #[error("NCCL could not {action}: {code} ({message})")]
    Nccl {
        /// What was being done.
        action: &'static str,
        /// NCCL's result code.
        code: String,
        /// NCCL's description of it.
        message: String,
    },
    /// The ranks were not given the same model or settings.
    #[error("the ranks disagree on {what}: {values}")]
    RanksDisagree {
        /// The setting.
        what: &'static str,
        /// Each rank's value, as `rank: value`.
        values: String,
    },
    /// A placement of experts on ranks that is not one: an expert on no rank or on
    /// two, local ids that are not `0..L`, a world that does not divide the experts.
    #[error("invalid expert placement: {0}")]
    Placement(String),
    /// Another rank failed this call or setup (its own error is on that rank).
    #[error("rank {rank} failed {what}; this rank took part and stopped with it")]
    PeerFailed {
        /// The first rank that failed.
        rank: usize,
        /// The step.
        what: &'static str,
    },
    /// A call's shape or size that this exchange or block cannot take.
    #[error("{0}")]
    Shape(String),
    /// An error of the permute runtime (validation, the driver, a kernel).
    #[error(transparent)]
    Runtime(#[from] MoeError),
    /// An error of the expert backends (GEMMs, router, weights).
    #[error(transparent)]
    Experts(#[from] ExpertsError),
}

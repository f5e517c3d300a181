//! What a permute scratch is built for, and the check of a call against it.
//!
//! [`ScratchConfig::validate`] is a pure function of shapes, dtypes and devices: it is
//! the same check on every device, runs before any memory is touched, and never
//! allocates.

use serde::{Deserialize, Serialize};

use crate::size::product;
use crate::{ConfigError, DType, Device, MoeError, Result, ScratchMismatch};

/// The largest index the runtime stores: `permuted_idx`, `inv_permuted_idx` and
/// `sorted_ids` are `i32`, and `N*K` is itself the sentinel for dropped entries.
const MAX_INDEX: u128 = i32::MAX as u128;

/// Length of align's `sorted_ids` for `entries` entries: each of the at most
/// `min(L, entries)` non-empty experts adds at most `block_size - 1` padding rows.
pub fn max_padded_rows(entries: usize, num_local: usize, block_size: usize) -> usize {
    entries + entries.min(num_local) * (block_size - 1)
}

/// The permuted hidden states a scratch owns (the Humming-style backends' case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RowSpec {
    /// `H`, elements in one row.
    pub hidden_size: usize,
    /// The element type of the rows.
    pub dtype: DType,
    /// `S`, per-token f32 scales that travel with each row (0 for none).
    pub scale_columns: usize,
}

impl RowSpec {
    /// Bytes in one row, or [`MoeError::SizeOverflow`] when `hidden_size * dtype size`
    /// does not fit in usize (the fields are public: any spec can be built).
    pub fn row_bytes(&self) -> Result<usize> {
        self.dtype.row_bytes(self.hidden_size)
    }

    /// Bytes of `rows` rows of this spec, checked.
    pub(crate) fn rows_bytes(&self, rows: usize) -> Result<usize> {
        product(
            "permuted_hidden_states bytes (rows * hidden_size * dtype size)",
            &[rows, self.hidden_size, self.dtype.size_bytes()],
        )
    }

    /// Scales of `rows` rows of this spec, checked.
    pub(crate) fn scales_len(&self, rows: usize) -> Result<usize> {
        product(
            "permuted_scales elements (rows * scale_columns)",
            &[rows, self.scale_columns],
        )
    }

    /// Checks a permute's inputs against `N`: one row of hidden states, and one of
    /// scales when given, per token (the same on every device).
    pub(crate) fn check_input_rows(
        num_tokens: usize,
        hidden_rows: usize,
        scale_rows: Option<usize>,
    ) -> Result<()> {
        let mismatch = [("hidden_states", Some(hidden_rows)), ("scales", scale_rows)]
            .into_iter()
            .find(|(_, rows)| rows.is_some_and(|rows| rows != num_tokens));
        match mismatch {
            Some((tensor, rows)) => Err(MoeError::Shape {
                tensor,
                len: rows.unwrap_or(0),
                expected: format!("one row per token of topk_ids ({num_tokens})"),
            }),
            None => Ok(()),
        }
    }

    /// Checks a caller's permute destination for `entries` rows of this spec: the
    /// same dtype and hidden size, room for every row, and scales exactly when the
    /// input has them (the same on every device).
    pub(crate) fn check_destination(
        &self,
        entries: usize,
        dtype: DType,
        hidden_size: usize,
        bytes: usize,
        scales_len: Option<usize>,
    ) -> Result<()> {
        if dtype != self.dtype {
            return Err(MoeError::Dtype {
                tensor: "permuted_hidden_states",
                op: "permute",
                expected: self.dtype,
                got: dtype,
            });
        }
        if hidden_size != self.hidden_size || bytes < self.rows_bytes(entries)? {
            return Err(MoeError::Shape {
                tensor: "permuted_hidden_states",
                len: bytes / dtype.size_bytes(),
                expected: format!("at least N*K = {entries} rows of {}", self.hidden_size),
            });
        }
        let columns = self.scale_columns;
        let needed = self.scales_len(entries)?;
        let scales_fit = match scales_len {
            None => columns == 0,
            Some(len) => columns > 0 && len >= needed,
        };
        if !scales_fit {
            return Err(MoeError::Shape {
                tensor: "permuted_scales",
                len: scales_len.unwrap_or(0),
                expected: format!(
                    "at least N*K*S = {needed} (given exactly when the input has scales)"
                ),
            });
        }
        Ok(())
    }
}

/// Everything a [`PermuteScratch`](crate::PermuteScratch) is sized for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScratchConfig {
    /// The most tokens one call may carry.
    pub max_num_tokens: usize,
    /// `K`, experts per token.
    pub topk: usize,
    /// `E`, global experts.
    pub num_experts: usize,
    /// `L`, experts on this rank (`L == E` without expert parallelism).
    pub num_local_experts: usize,
    /// When set, the scratch owns `permuted_hidden_states` (and the permuted scales).
    pub rows: Option<RowSpec>,
    /// When set, the scratch owns the buffers of `align` for this block size.
    pub align_block_size: Option<usize>,
    /// Where the scratch's memory lives; every tensor of a call must be there too.
    pub device: Device,
}

/// The shape of one call, as [`ScratchConfig::validate`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct CallShape<'a> {
    /// `N`.
    pub num_tokens: usize,
    /// `K` of `topk_ids`.
    pub topk: usize,
    /// Length of `expert_map`, when one is given.
    pub expert_map_len: Option<usize>,
    /// The rows the call writes into the scratch's own buffer; `None` when the caller
    /// supplies the destination or the call moves no rows.
    pub rows: Option<RowSpec>,
    /// Whether the call needs the align buffers.
    pub align: bool,
    /// Each tensor of the call, by name, with the device it lives on.
    pub devices: &'a [(&'static str, Device)],
}

impl ScratchConfig {
    /// A scratch for calls of up to `max_num_tokens` tokens that does not own the
    /// permuted hidden states (the caller or the expert backend owns them).
    pub fn new(
        max_num_tokens: usize,
        topk: usize,
        num_experts: usize,
        num_local_experts: usize,
        device: Device,
    ) -> Self {
        Self {
            max_num_tokens,
            topk,
            num_experts,
            num_local_experts,
            rows: None,
            align_block_size: None,
            device,
        }
    }

    /// A scratch sized for exactly one call of `num_tokens` tokens of `topk` that owns
    /// rows of `spec`: what the allocating baselines build for every call.
    pub(crate) fn for_one_call(
        spec: RowSpec,
        (num_tokens, topk): (usize, usize),
        (num_experts, num_local_experts): (usize, usize),
        device: Device,
    ) -> Self {
        Self::new(num_tokens, topk, num_experts, num_local_experts, device)
            .with_rows(spec.hidden_size, spec.dtype)
            .with_scale_columns(spec.scale_columns)
    }

    /// The scratch also owns `permuted_hidden_states` of `hidden_size` elements of `dtype`.
    pub fn with_rows(mut self, hidden_size: usize, dtype: DType) -> Self {
        self.rows = Some(RowSpec {
            hidden_size,
            dtype,
            scale_columns: self.rows.map_or(0, |rows| rows.scale_columns),
        });
        self
    }

    /// The owned rows carry `columns` per-token f32 scales (needs [`Self::with_rows`]).
    pub fn with_scale_columns(mut self, columns: usize) -> Self {
        if let Some(rows) = &mut self.rows {
            rows.scale_columns = columns;
        }
        self
    }

    /// The scratch also owns the buffers of `align` for `block_size`.
    pub fn with_align_block_size(mut self, block_size: usize) -> Self {
        self.align_block_size = Some(block_size);
        self
    }

    /// `max_num_tokens * topk`: rows of the permuted buffers.
    ///
    /// Checked, not saturating: a saturated count would size buffers for the wrong
    /// number of rows. [`MoeError::SizeOverflow`] when the product does not fit in
    /// usize; always `Ok` for a configuration that passed [`Self::check`] (which
    /// refuses any count above `i32::MAX`).
    pub fn max_entries(&self) -> Result<usize> {
        product(
            "max entries (max_num_tokens * topk)",
            &[self.max_num_tokens, self.topk],
        )
    }

    /// Bytes of the owned `permuted_hidden_states` and elements of `permuted_scales`
    /// (both 0 without rows), checked.
    pub(crate) fn row_buffer_sizes(&self) -> Result<(usize, usize)> {
        let entries = self.max_entries()?;
        match self.rows {
            Some(rows) => Ok((rows.rows_bytes(entries)?, rows.scales_len(entries)?)),
            None => Ok((0, 0)),
        }
    }

    /// What building a scratch checks before it allocates anything: [`Self::check`],
    /// and that every buffer size the configuration implies fits in usize.
    pub(crate) fn check_buildable(&self) -> Result<()> {
        self.check()?;
        self.row_buffer_sizes()?;
        Ok(())
    }

    /// Checks that the configuration can be built; every index it implies fits in i32.
    ///
    /// The byte sizes of the owned rows are checked when a scratch is built
    /// ([`MoeError::SizeOverflow`] when they do not fit in usize, then
    /// [`MoeError::OutOfMemory`] when the memory cannot be had).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.topk == 0 {
            return Err(ConfigError::ZeroTopk);
        }
        if self.num_experts == 0 {
            return Err(ConfigError::ZeroExperts);
        }
        if self.num_experts as u128 > MAX_INDEX {
            return Err(ConfigError::TooManyExperts(self.num_experts));
        }
        if self.num_local_experts == 0 || self.num_local_experts > self.num_experts {
            return Err(ConfigError::LocalExperts {
                local: self.num_local_experts,
                global: self.num_experts,
            });
        }
        if self.rows.is_some_and(|rows| rows.hidden_size == 0) {
            return Err(ConfigError::ZeroHiddenSize);
        }
        if self.align_block_size == Some(0) {
            return Err(ConfigError::ZeroBlockSize);
        }
        let entries = self.max_num_tokens as u128 * self.topk as u128;
        let block = self.align_block_size.unwrap_or(1) as u128;
        // Saturating: only a count far beyond i32 reaches u128::MAX, and it is refused
        // the same way.
        let rows =
            entries.saturating_add(entries.min(self.num_local_experts as u128) * (block - 1));
        if rows > MAX_INDEX {
            return Err(ConfigError::IndexOverflow { rows });
        }
        Ok(())
    }

    /// Checks one call against this configuration: the first mismatch found is named.
    pub fn validate(&self, call: &CallShape<'_>) -> Result<(), ScratchMismatch> {
        // A property of the call alone: checked first, so it is reported even when the
        // call also exceeds max_num_tokens.
        let fits_i32 = call
            .num_tokens
            .checked_mul(call.topk)
            .is_some_and(|entries| entries as u128 <= MAX_INDEX);
        if !fits_i32 {
            return Err(ScratchMismatch::IndexOverflow {
                num_tokens: call.num_tokens,
                topk: call.topk,
            });
        }
        if let Some(&(tensor, got)) = call.devices.iter().find(|(_, d)| *d != self.device) {
            return Err(ScratchMismatch::Device {
                tensor,
                expected: self.device,
                got,
            });
        }
        if call.topk != self.topk {
            return Err(ScratchMismatch::Topk {
                expected: self.topk,
                got: call.topk,
            });
        }
        if call.num_tokens > self.max_num_tokens {
            return Err(ScratchMismatch::TooManyTokens {
                num_tokens: call.num_tokens,
                max_num_tokens: self.max_num_tokens,
            });
        }
        match call.expert_map_len {
            Some(len) if len != self.num_experts => {
                return Err(ScratchMismatch::NumExperts {
                    expected: self.num_experts,
                    got: len,
                });
            }
            None if self.num_local_experts != self.num_experts => {
                return Err(ScratchMismatch::MissingExpertMap {
                    num_experts: self.num_experts,
                    num_local_experts: self.num_local_experts,
                });
            }
            _ => {}
        }
        if let Some(got) = call.rows {
            let expected = self.rows.ok_or(ScratchMismatch::NoRowBuffer)?;
            if got.hidden_size != expected.hidden_size {
                return Err(ScratchMismatch::HiddenSize {
                    expected: expected.hidden_size,
                    got: got.hidden_size,
                });
            }
            if got.dtype != expected.dtype {
                return Err(ScratchMismatch::Dtype {
                    expected: expected.dtype,
                    got: got.dtype,
                });
            }
            if got.scale_columns != expected.scale_columns {
                return Err(ScratchMismatch::ScaleColumns {
                    expected: expected.scale_columns,
                    got: got.scale_columns,
                });
            }
        }
        if call.align && self.align_block_size.is_none() {
            return Err(ScratchMismatch::NoAlignBuffers);
        }
        Ok(())
    }

    /// Whether every call this configuration accepts is also accepted by `self`, and
    /// `self` owns at least the buffers `other` owns.
    pub fn covers(&self, other: &ScratchConfig) -> bool {
        self.max_num_tokens >= other.max_num_tokens
            && self.topk == other.topk
            && self.num_experts == other.num_experts
            && self.num_local_experts == other.num_local_experts
            && self.device == other.device
            && (other.rows.is_none() || self.rows == other.rows)
            && (other.align_block_size.is_none() || self.align_block_size == other.align_block_size)
    }
}

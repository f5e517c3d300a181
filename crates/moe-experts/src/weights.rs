//! One MoE layer's weights, in host memory, loaded from a Hugging Face safetensors
//! checkpoint or made up for tests and benchmarks.

use half::bf16;
use moe_runtime::size::{product, zeroed};
use safetensors::{Dtype, SafeTensors};

use crate::checkpoint::{Mapped, Tensors, shard_paths};
use crate::{ExpertsError, MoeConfig, Result, Routing};

/// Elements of each tensor of a layer of hidden size `h`, intermediate size `i` and
/// `e` experts, in the order router, gate, up, down; checked, since all three are
/// caller-given numbers.
fn tensor_lens(h: usize, i: usize, e: usize) -> Result<[(&'static str, usize); 4]> {
    let experts = product("expert weights (E * I * H)", &[e, i, h])?;
    Ok([
        ("router", product("router weights (E * H)", &[e, h])?),
        ("gate_proj", experts),
        ("up_proj", experts),
        ("down_proj", experts),
    ])
}

/// Checks that tensors of the given lengths (router, gate, up, down) are those of a
/// layer of sizes `(h, i, e)`: the one check of weight lengths, for the weights as
/// loaded and as the CPU backends hold them.
pub(crate) fn check_lens(h: usize, i: usize, e: usize, lens: [usize; 4]) -> Result<()> {
    for ((tensor, expected), len) in tensor_lens(h, i, e)?.into_iter().zip(lens) {
        if len != expected {
            return Err(ExpertsError::Shape {
                tensor,
                len,
                expected: format!("{expected} elements"),
            });
        }
    }
    Ok(())
}

/// `len` bf16 values from `value`, in host memory allocated fallibly (the length is
/// computed from caller-given sizes).
fn filled(
    tensor: &'static str,
    len: usize,
    mut value: impl FnMut(usize) -> bf16,
) -> Result<Vec<bf16>> {
    let mut out: Vec<bf16> = zeroed(tensor, len)?;
    for (index, out) in out.iter_mut().enumerate() {
        *out = value(index);
    }
    Ok(out)
}

/// How a checkpoint names the tensors of a MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `{p}.block_sparse_moe.gate`, `{p}.block_sparse_moe.experts.{e}.w1` (gate),
    /// `w3` (up), `w2` (down).
    Mixtral,
    /// `{p}.mlp.gate`, `{p}.mlp.experts.{e}.gate_proj`, `up_proj`, `down_proj`
    /// (Qwen3-MoE).
    QwenMoe,
    /// The Qwen-MoE names, plus `{p}.mlp.gate.e_score_correction_bias` and the shared
    /// expert `{p}.mlp.shared_experts.{gate,up,down}_proj` (DeepSeek-V3, Kimi-K2,
    /// GLM-4.5).
    DeepSeekV3,
}

impl Layout {
    /// The layout's name, for errors and reports.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Mixtral => "Mixtral",
            Layout::QwenMoe => "Qwen-MoE",
            Layout::DeepSeekV3 => "DeepSeek-V3",
        }
    }

    /// The name of the router's weight `[E, H]`.
    pub fn router(self, prefix: &str) -> String {
        match self {
            Layout::Mixtral => format!("{prefix}.block_sparse_moe.gate.weight"),
            Layout::QwenMoe | Layout::DeepSeekV3 => format!("{prefix}.mlp.gate.weight"),
        }
    }

    /// The prefix of every tensor of the layer's MoE module (`{p}.block_sparse_moe.`,
    /// `{p}.mlp.`).
    pub fn module(self, prefix: &str) -> String {
        match self {
            Layout::Mixtral => format!("{prefix}.block_sparse_moe."),
            Layout::QwenMoe | Layout::DeepSeekV3 => format!("{prefix}.mlp."),
        }
    }

    /// The names of expert `expert`'s gate, up and down projections, `[I, H]`,
    /// `[I, H]` and `[H, I]`.
    pub fn expert(self, prefix: &str, expert: usize) -> [String; 3] {
        match self {
            Layout::Mixtral => ["w1", "w3", "w2"]
                .map(|w| format!("{prefix}.block_sparse_moe.experts.{expert}.{w}.weight")),
            Layout::QwenMoe | Layout::DeepSeekV3 => ["gate_proj", "up_proj", "down_proj"]
                .map(|w| format!("{prefix}.mlp.experts.{expert}.{w}.weight")),
        }
    }

    /// The name of the score correction `[E]` (DeepSeek-V3's
    /// `e_score_correction_bias`), in the layouts that have one.
    pub fn score_correction(self, prefix: &str) -> Option<String> {
        (self == Layout::DeepSeekV3).then(|| format!("{prefix}.mlp.gate.e_score_correction_bias"))
    }

    /// The names of the shared expert's gate, up and down projections, `[I_s, H]`,
    /// `[I_s, H]` and `[H, I_s]`, in the layouts that have one.
    pub fn shared_expert(self, prefix: &str) -> Option<[String; 3]> {
        (self == Layout::DeepSeekV3).then(|| {
            ["gate_proj", "up_proj", "down_proj"]
                .map(|w| format!("{prefix}.mlp.shared_experts.{w}.weight"))
        })
    }
}

/// The shared expert: one MLP every token goes through, its output added to the
/// routed experts' (DeepSeek-V3).
#[derive(Clone, Debug)]
pub struct SharedExpertWeights {
    /// `I_s`.
    pub intermediate_size: usize,
    /// `[I_s, H]`.
    pub gate_proj: Vec<bf16>,
    /// `[I_s, H]`.
    pub up_proj: Vec<bf16>,
    /// `[H, I_s]`.
    pub down_proj: Vec<bf16>,
}

/// The weights of one MoE layer, bf16, row-major as `nn.Linear` stores them.
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// `H`. With `I` and `E`, the layer's sizes (routing settings are not part of a
    /// checkpoint's tensors).
    pub hidden_size: usize,
    /// `I`, each expert's intermediate size.
    pub intermediate_size: usize,
    /// `E`.
    pub num_experts: usize,
    /// `[E, H]`.
    pub router: Vec<bf16>,
    /// `[E, I, H]`.
    pub gate_proj: Vec<bf16>,
    /// `[E, I, H]`.
    pub up_proj: Vec<bf16>,
    /// `[E, H, I]`.
    pub down_proj: Vec<bf16>,
    /// `[E]`: DeepSeek-V3's `e_score_correction_bias`, added to the scores for the
    /// choice of experts only ([`Routing::Grouped`]).
    pub router_bias: Option<Vec<f32>>,
    /// The shared expert, where the layer has one.
    pub shared: Option<SharedExpertWeights>,
}

impl MoeWeights {
    /// Reads one layer, chosen by `prefix`, from a checkpoint: a safetensors file, a
    /// sharded checkpoint's `model.safetensors.index.json`, or a directory holding
    /// either. Only the shards that hold the layer are opened (memory-mapped), and
    /// only its tensors are read. `prefix` is the layer's (`model.layers.3`) or its MoE
    /// module's (`model.layers.3.mlp`, `model.layers.3.block_sparse_moe`). The layout
    /// is found from the tensor names; bf16 and f32 tensors are accepted (f32 is
    /// rounded to bf16). A missing shard or tensor is an error naming it.
    pub fn load(path: &std::path::Path, prefix: &str) -> Result<(Self, Layout)> {
        Self::load_some(path, prefix, None)
    }

    /// [`Self::load`] for one rank of expert parallelism: the router, the correction
    /// and the shared expert, and of the experts only those in `experts` (global ids).
    /// Every expert's tensors must still be in the checkpoint with their shapes; the
    /// others' weights are left zero, in memory from `calloc` that is never written,
    /// so they take address space, not memory. An id of `experts` outside the layer's
    /// experts is an error.
    pub fn load_experts(
        path: &std::path::Path,
        prefix: &str,
        experts: &[usize],
    ) -> Result<(Self, Layout)> {
        Self::load_some(path, prefix, Some(experts))
    }

    /// The layer under `prefix` in the checkpoint at `path`, with the experts of
    /// `only` (all when `None`).
    fn load_some(
        path: &std::path::Path,
        prefix: &str,
        only: Option<&[usize]>,
    ) -> Result<(Self, Layout)> {
        let prefix = layer_prefix(prefix);
        let shards = shard_paths(path, prefix)?;
        if shards.is_empty() {
            return Err(ExpertsError::NoMoeLayer {
                prefix: prefix.to_string(),
            });
        }
        let mapped = Mapped::open(&shards)?;
        Self::from_tensors(&mapped.tensors()?, prefix, only)
    }

    /// [`Self::load`] from the bytes of one safetensors file.
    pub fn from_safetensors(bytes: &[u8], prefix: &str) -> Result<(Self, Layout)> {
        Self::from_bytes(bytes, prefix, None)
    }

    /// [`Self::load_experts`] from the bytes of one safetensors file.
    pub fn experts_from_safetensors(
        bytes: &[u8],
        prefix: &str,
        experts: &[usize],
    ) -> Result<(Self, Layout)> {
        Self::from_bytes(bytes, prefix, Some(experts))
    }

    /// The layer under `prefix` in the bytes of one safetensors file, with the experts
    /// of `only` (all when `None`).
    fn from_bytes(bytes: &[u8], prefix: &str, only: Option<&[usize]>) -> Result<(Self, Layout)> {
        let file =
            SafeTensors::deserialize(bytes).map_err(|e| ExpertsError::Format(e.to_string()))?;
        Self::from_tensors(&Tensors::new(vec![file])?, layer_prefix(prefix), only)
    }

    /// The layer under `prefix`, with the experts of `only` (all when `None`).
    fn from_tensors(
        file: &Tensors<'_>,
        prefix: &str,
        only: Option<&[usize]>,
    ) -> Result<(Self, Layout)> {
        let names = file.names();
        let layout = [Layout::Mixtral, Layout::QwenMoe]
            .into_iter()
            .find(|layout| names.contains(&layout.router(prefix)))
            .ok_or_else(|| ExpertsError::NoMoeLayer {
                prefix: prefix.to_string(),
            })?;
        // DeepSeek-V3 is the Qwen names with a score correction and a shared expert.
        let deepseek = Layout::DeepSeekV3;
        let extras = [
            deepseek.score_correction(prefix),
            deepseek.shared_expert(prefix).map(|[gate, ..]| gate),
        ];
        let layout = match layout {
            Layout::QwenMoe if extras.iter().flatten().any(|name| names.contains(name)) => deepseek,
            layout => layout,
        };
        let router_name = layout.router(prefix);
        let router_shape = shape_of(file, &router_name, layout)?;
        refuse_unknown_tensors(&names, layout, prefix, router_shape.first().copied())?;
        let [num_experts, hidden_size] = router_shape[..] else {
            return Err(ExpertsError::TensorShape {
                name: router_name,
                expected: vec![0, 0],
                got: router_shape,
            });
        };
        let [gate0, ..] = layout.expert(prefix, 0);
        let intermediate_size = width_of(file, &gate0, hidden_size, layout)?;
        let (h, i) = (hidden_size, intermediate_size);
        // Every expert's tensors are there with their shapes before any memory is
        // reserved for them: the sizes come from the file's header.
        for expert in 0..num_experts {
            let [gate, up, down] = layout.expert(prefix, expert);
            for (name, shape) in [(gate, [i, h]), (up, [i, h]), (down, [h, i])] {
                let got = shape_of(file, &name, layout)?;
                if got != shape {
                    return Err(ExpertsError::TensorShape {
                        name,
                        expected: shape.to_vec(),
                        got,
                    });
                }
            }
        }
        // Sized from the header, but every tensor was just found with its shape, so the
        // file holds at least as many values.
        let [_, gate_len, up_len, down_len] = tensor_lens(h, i, num_experts)?;
        let router_bias = match layout.score_correction(prefix) {
            // f32, not rounded: the correction decides between close scores.
            Some(name) if names.contains(&name) => {
                Some(read_f32(file, &name, &[num_experts], layout)?)
            }
            _ => None,
        };
        let shared = match layout.shared_expert(prefix) {
            Some(names3) if names.contains(&names3[0]) => {
                Some(read_shared(file, names3, h, layout)?)
            }
            _ => None,
        };
        let mut weights = MoeWeights {
            hidden_size,
            intermediate_size,
            num_experts,
            router: read(file, &router_name, &[num_experts, h], layout)?,
            gate_proj: zeroed(gate_len.0, gate_len.1)?,
            up_proj: zeroed(up_len.0, up_len.1)?,
            down_proj: zeroed(down_len.0, down_len.1)?,
            router_bias,
            shared,
        };
        if let Some(&expert) = only.into_iter().flatten().find(|&&e| e >= num_experts) {
            return Err(ExpertsError::Config(format!(
                "expert {expert} was asked for, but the layer has {num_experts} experts"
            )));
        }
        // `per_expert * num_experts` fits: it is the length just allocated.
        let per_expert = i * h;
        for expert in 0..num_experts {
            if only.is_some_and(|only| !only.contains(&expert)) {
                continue;
            }
            let [gate, up, down] = layout.expert(prefix, expert);
            let range = expert * per_expert..(expert + 1) * per_expert;
            weights.gate_proj[range.clone()].copy_from_slice(&read(file, &gate, &[i, h], layout)?);
            weights.up_proj[range.clone()].copy_from_slice(&read(file, &up, &[i, h], layout)?);
            weights.down_proj[range].copy_from_slice(&read(file, &down, &[h, i], layout)?);
        }
        Ok((weights, layout))
    }

    /// Random weights of the given sizes (a fixed seed gives the same weights), scaled
    /// like an initialised layer: entries of about `1/sqrt(fan_in)`.
    ///
    /// Sizes whose element counts do not fit in usize are
    /// [`MoeError::SizeOverflow`](moe_runtime::MoeError::SizeOverflow), memory that
    /// cannot be had is [`MoeError::OutOfMemory`](moe_runtime::MoeError::OutOfMemory).
    pub fn random(config: &MoeConfig, seed: u64) -> Result<Self> {
        let (h, i, e) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
        );
        let [router, gate, up, down] = tensor_lens(h, i, e)?;
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut fill = |(tensor, len): (&'static str, usize), fan_in: usize| {
            let scale = 1.0 / (fan_in as f32).sqrt();
            filled(tensor, len, |_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                bf16::from_f32(unit * scale * 1.7)
            })
        };
        let (router, gate_proj, up_proj, down_proj) = (
            fill(router, h)?,
            fill(gate, h)?,
            fill(up, h)?,
            fill(down, i)?,
        );
        // A score correction of about the size of the scores' spread, so that it
        // changes some choices.
        let router_bias = matches!(config.routing, Routing::Grouped(_))
            .then(|| fill(("e_score_correction_bias", e), 16))
            .transpose()?
            .map(|bias| bias.iter().map(|v| v.to_f32()).collect());
        let shared = match config.shared_intermediate_size {
            0 => None,
            s => {
                let len = product("shared expert weights (I_s * H)", &[s, h])?;
                Some(SharedExpertWeights {
                    intermediate_size: s,
                    gate_proj: fill(("shared gate_proj", len), h)?,
                    up_proj: fill(("shared up_proj", len), h)?,
                    down_proj: fill(("shared down_proj", len), s)?,
                })
            }
        };
        Ok(MoeWeights {
            hidden_size: h,
            intermediate_size: i,
            num_experts: e,
            router,
            gate_proj,
            up_proj,
            down_proj,
            router_bias,
            shared,
        })
    }

    /// Weights of the given sizes made from a 64 Ki-element random pattern repeated,
    /// each tensor starting at a different offset: non-zero, varied values at the cost
    /// of a copy, for benchmarks of full-size layers (whose time depends on the values
    /// only through the routing, and must not be measured on zeros). Fails as
    /// [`Self::random`] does.
    pub fn repeating(config: &MoeConfig, seed: u64) -> Result<Self> {
        const PATTERN: usize = 1 << 16;
        let sample = MoeConfig {
            hidden_size: PATTERN,
            intermediate_size: 1,
            num_experts: 1,
            top_k: 1,
            norm_topk_prob: false,
            routing: Routing::Softmax,
            shared_intermediate_size: 0,
        };
        let pattern = Self::random(&sample, seed)?.router;
        let tile = |(tensor, len): (&'static str, usize), offset: usize| {
            filled(tensor, len, |i| pattern[(i % PATTERN + offset) % PATTERN])
        };
        let (h, i, e) = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
        );
        let [router, gate, up, down] = tensor_lens(h, i, e)?;
        // The score correction and shared expert are small: taken from `random`.
        let small = Self::random(
            &MoeConfig {
                intermediate_size: 1,
                ..config.clone()
            },
            seed,
        )?;
        Ok(MoeWeights {
            hidden_size: h,
            intermediate_size: i,
            num_experts: e,
            router: tile(router, 0)?,
            gate_proj: tile(gate, 101)?,
            up_proj: tile(up, 202)?,
            down_proj: tile(down, 303)?,
            // A sixteenth of `random`'s correction: a trained router's is small beside
            // its scores' spread (it only balances the load), and one as large as
            // `random`'s sends most tokens to the same few experts, which would flatter
            // a block's time.
            router_bias: small
                .router_bias
                .map(|bias| bias.iter().map(|b| b / 16.0).collect()),
            shared: small.shared,
        })
    }

    /// Checks the weights against a block configuration.
    pub fn check(&self, config: &MoeConfig) -> Result<()> {
        config.check()?;
        let dims = (self.hidden_size, self.intermediate_size, self.num_experts);
        let want = (
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
        );
        if dims != want {
            return Err(ExpertsError::Config(format!(
                "weights are (H, I, E) = {dims:?}, the block is {want:?}"
            )));
        }
        let (h, i, e) = dims;
        check_lens(
            h,
            i,
            e,
            [
                self.router.len(),
                self.gate_proj.len(),
                self.up_proj.len(),
                self.down_proj.len(),
            ],
        )?;
        let grouped = matches!(config.routing, Routing::Grouped(_));
        match &self.router_bias {
            Some(bias) if !grouped => {
                return Err(ExpertsError::Config(format!(
                    "the weights have a score correction ({} values), which only \
                     DeepSeek-V3 routing uses, and the block routes with {:?}",
                    bias.len(),
                    config.routing
                )));
            }
            Some(bias) if bias.len() != e => {
                return Err(ExpertsError::Shape {
                    tensor: "e_score_correction_bias",
                    len: bias.len(),
                    expected: format!("{e} values, one per expert"),
                });
            }
            None if grouped => {
                return Err(ExpertsError::Config(
                    "DeepSeek-V3 routing needs the score correction (e_score_correction_bias)"
                        .into(),
                ));
            }
            _ => {}
        }
        let shared = self
            .shared
            .as_ref()
            .map(|s| s.intermediate_size)
            .unwrap_or(0);
        if shared != config.shared_intermediate_size {
            return Err(ExpertsError::Config(format!(
                "the weights' shared expert is {shared} wide (0: none), the block's {}",
                config.shared_intermediate_size
            )));
        }
        if let Some(s) = &self.shared {
            let len = product("shared expert weights (I_s * H)", &[s.intermediate_size, h])?;
            for (tensor, got) in [
                ("shared gate_proj", s.gate_proj.len()),
                ("shared up_proj", s.up_proj.len()),
                ("shared down_proj", s.down_proj.len()),
            ] {
                if got != len {
                    return Err(ExpertsError::Shape {
                        tensor,
                        len: got,
                        expected: format!("{len} elements"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Refuses a layer whose MoE module holds a tensor the block does not read: a shared
/// expert (Qwen2-MoE's `shared_expert`, DeepSeek-V3's `shared_experts`), a router
/// bias or score correction (`e_score_correction_bias`), quantisation scales. Read
/// without it, the layer would give wrong output with no error.
fn refuse_unknown_tensors(
    names: &[String],
    layout: Layout,
    prefix: &str,
    num_experts: Option<usize>,
) -> Result<()> {
    let module = layout.module(prefix);
    let router = layout.router(prefix);
    let extras: Vec<String> = layout
        .score_correction(prefix)
        .into_iter()
        .chain(layout.shared_expert(prefix).into_iter().flatten())
        .collect();
    let known = |name: &str| {
        if name == router || extras.iter().any(|extra| extra == name) {
            return true;
        }
        // `{module}experts.{e}.{projection}.weight` with e below the router's E.
        let Some(rest) = name
            .strip_prefix(&module)
            .and_then(|r| r.strip_prefix("experts."))
        else {
            return false;
        };
        let Some((expert, _)) = rest.split_once('.') else {
            return false;
        };
        match (expert.parse::<usize>(), num_experts) {
            (Ok(e), Some(count)) if e < count => {
                layout.expert(prefix, e).contains(&name.to_string())
            }
            _ => false,
        }
    };
    let mut unknown: Vec<&String> = names
        .iter()
        .filter(|name| name.starts_with(&module) && !known(name))
        .collect();
    unknown.sort();
    match unknown.first() {
        Some(name) => Err(ExpertsError::UnsupportedTensor {
            name: name.to_string(),
            layout: layout.name(),
        }),
        None => Ok(()),
    }
}

/// The intermediate size `I` of an MLP, from the shape `[I, H]` of its gate
/// projection `gate`; the gate must be there with rows of `h`.
fn width_of(file: &Tensors<'_>, gate: &str, h: usize, layout: Layout) -> Result<usize> {
    let shape = shape_of(file, gate, layout)?;
    match shape[..] {
        [i, gh] if gh == h => Ok(i),
        _ => Err(ExpertsError::TensorShape {
            name: gate.to_string(),
            expected: vec![0, h],
            got: shape,
        }),
    }
}

/// The shared expert's three projections, their width from the gate's shape.
fn read_shared(
    file: &Tensors<'_>,
    [gate, up, down]: [String; 3],
    h: usize,
    layout: Layout,
) -> Result<SharedExpertWeights> {
    let i = width_of(file, &gate, h, layout)?;
    Ok(SharedExpertWeights {
        intermediate_size: i,
        gate_proj: read(file, &gate, &[i, h], layout)?,
        up_proj: read(file, &up, &[i, h], layout)?,
        down_proj: read(file, &down, &[h, i], layout)?,
    })
}

/// The layer's own prefix, from it or from its MoE module's (what a user copies from
/// an index file): `model.layers.3.mlp` and `model.layers.3.block_sparse_moe` are
/// `model.layers.3`.
fn layer_prefix(prefix: &str) -> &str {
    let prefix = prefix.trim_end_matches('.');
    prefix
        .strip_suffix(".block_sparse_moe")
        .or_else(|| prefix.strip_suffix(".mlp"))
        .unwrap_or(prefix)
}

fn shape_of(file: &Tensors<'_>, name: &str, layout: Layout) -> Result<Vec<usize>> {
    file.get(name)
        .map(|t| t.shape().to_vec())
        .ok_or_else(|| ExpertsError::MissingTensor {
            name: name.to_string(),
            layout: layout.name(),
        })
}

/// Reads tensor `name`, checking its shape, as bf16 (f32 values are rounded).
fn read(file: &Tensors<'_>, name: &str, shape: &[usize], layout: Layout) -> Result<Vec<bf16>> {
    Ok(read_f32(file, name, shape, layout)?
        .into_iter()
        .map(bf16::from_f32)
        .collect())
}

/// Reads tensor `name`, checking its shape, as f32 (bf16 values widened exactly).
fn read_f32(file: &Tensors<'_>, name: &str, shape: &[usize], layout: Layout) -> Result<Vec<f32>> {
    let tensor = file.get(name).ok_or_else(|| ExpertsError::MissingTensor {
        name: name.to_string(),
        layout: layout.name(),
    })?;
    if tensor.shape() != shape {
        return Err(ExpertsError::TensorShape {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: tensor.shape().to_vec(),
        });
    }
    let data = tensor.data();
    match tensor.dtype() {
        Dtype::BF16 => Ok(data
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect()),
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        other => Err(ExpertsError::TensorDtype {
            name: name.to_string(),
            got: format!("{other:?}"),
        }),
    }
}

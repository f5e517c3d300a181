//! Where a layer's tensors come from: one safetensors file, or a checkpoint directory
//! of shards with its `model.safetensors.index.json`, as people download them. Only
//! the shards that hold the requested layer are opened, memory-mapped, and only that
//! layer's tensors are read from them.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use crate::{ExpertsError, Result};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The one file of an unsharded checkpoint directory.
pub const SINGLE_FILE: &str = "model.safetensors";

/// The files to open for the tensors under `prefix` (`{prefix}.…`), from `path`: a
/// safetensors file, an index file, or a directory holding either.
pub(crate) fn shard_paths(path: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let index = if path.is_dir() {
        let index = path.join(INDEX_FILE);
        if !index.exists() {
            let single = path.join(SINGLE_FILE);
            if single.exists() {
                return Ok(vec![single]);
            }
            return Err(ExpertsError::Format(format!(
                "{} holds neither {INDEX_FILE} nor {SINGLE_FILE}",
                path.display()
            )));
        }
        index
    } else if path.extension().is_some_and(|ext| ext == "json") {
        path.to_path_buf()
    } else {
        return Ok(vec![path.to_path_buf()]);
    };
    let text = std::fs::read_to_string(&index).map_err(|source| ExpertsError::Io {
        path: index.display().to_string(),
        source,
    })?;
    let shards = shards_of_layer(&text, prefix)
        .map_err(|reason| ExpertsError::Format(format!("{}: {reason}", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(shards.into_iter().map(|shard| dir.join(shard)).collect())
}

/// The shard files an index's `weight_map` gives for the tensors under `prefix`.
fn shards_of_layer(index: &str, prefix: &str) -> std::result::Result<Vec<String>, String> {
    let index: serde_json::Value =
        serde_json::from_str(index).map_err(|error| format!("not JSON ({error})"))?;
    let map = index
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or("no weight_map object")?;
    let layer = format!("{prefix}.");
    let mut shards = BTreeSet::new();
    for (name, shard) in map {
        if name.starts_with(&layer) {
            let shard = shard
                .as_str()
                .ok_or_else(|| format!("the shard of {name} is not a file name"))?;
            // A shard is a file beside the index, never a path elsewhere.
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(format!("shard {shard:?} is not a file beside the index"));
            }
            shards.insert(shard.to_string());
        }
    }
    Ok(shards.into_iter().collect())
}

/// Files mapped into memory, read-only.
pub(crate) struct Mapped {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
}

impl Mapped {
    /// Maps every file of `paths`; a missing or unreadable one is an error naming it.
    pub(crate) fn open(paths: &[PathBuf]) -> Result<Self> {
        let maps = paths
            .iter()
            .map(|path| {
                let io = |source| ExpertsError::Io {
                    path: path.display().to_string(),
                    source,
                };
                let file = File::open(path).map_err(io)?;
                // SAFETY: the map is read-only and lives as long as `Mapped`; a
                // checkpoint is not written while a layer is read from it (the same
                // assumption every safetensors loader makes: a file truncated under
                // the map would fault on read, not give wrong values silently).
                let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
                Ok((path.clone(), map))
            })
            .collect::<Result<_>>()?;
        Ok(Self { maps })
    }

    /// The parsed headers of the mapped files, as one set of tensors.
    pub(crate) fn tensors(&self) -> Result<Tensors<'_>> {
        let files = self
            .maps
            .iter()
            .map(|(path, map)| {
                SafeTensors::deserialize(map)
                    .map_err(|error| ExpertsError::Format(format!("{}: {error}", path.display())))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensors::new(files)
    }
}

/// The tensors of one or more safetensors files, by name.
pub(crate) struct Tensors<'a> {
    files: Vec<SafeTensors<'a>>,
    by_name: HashMap<String, usize>,
}

impl<'a> Tensors<'a> {
    pub(crate) fn new(files: Vec<SafeTensors<'a>>) -> Result<Self> {
        let mut by_name = HashMap::new();
        for (index, file) in files.iter().enumerate() {
            for name in file.names() {
                if by_name.insert(name.to_string(), index).is_some() {
                    return Err(ExpertsError::Format(format!(
                        "tensor {name} is in two shards"
                    )));
                }
            }
        }
        Ok(Self { files, by_name })
    }

    /// Every tensor name.
    pub(crate) fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// Tensor `name`, if there is one.
    pub(crate) fn get(&self, name: &str) -> Option<TensorView<'_>> {
        let file = &self.files[*self.by_name.get(name)?];
        file.tensor(name).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_shards_of_the_layer_are_listed() {
        let index = r#"{"metadata": {}, "weight_map": {
            "model.layers.3.mlp.gate.weight": "b.safetensors",
            "model.layers.3.mlp.experts.0.up_proj.weight": "c.safetensors",
            "model.layers.30.mlp.gate.weight": "d.safetensors",
            "model.layers.4.mlp.gate.weight": "e.safetensors"}}"#;
        assert_eq!(
            shards_of_layer(index, "model.layers.3").unwrap(),
            ["b.safetensors", "c.safetensors"]
        );
        let escape = r#"{"weight_map": {"model.layers.3.x": "../secret.safetensors"}}"#;
        assert!(shards_of_layer(escape, "model.layers.3").is_err());
        assert!(shards_of_layer("{}", "model.layers.3").is_err());
    }
}

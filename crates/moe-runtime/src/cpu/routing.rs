//! The index half of permute and align: a counting sort of entries by local expert.
//!
//! Entries `f = t*K + k` are cut into contiguous chunks. Each chunk maps its ids to
//! local experts and counts them per expert (in parallel); a serial scan over
//! `experts x chunks` turns the counts into per-chunk write cursors; each chunk then
//! places its entries (in parallel). Chunks are visited in order of `f` within each
//! expert, so the placement is stable: same input, same output, whatever the
//! thread count.

use rayon::prelude::*;

use crate::ExpertIds;

/// Entries below this count are handled by one chunk on the calling thread: for them
/// the fork/join of the thread pool costs more than the work.
const MIN_CHUNK_ENTRIES: usize = 4096;

/// How `N*K` entries are cut into chunks.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunks {
    /// Entries per chunk (the last may be shorter).
    pub(super) len: usize,
    /// Chunks in use, at most the scratch's chunk capacity.
    pub(super) count: usize,
}

impl Chunks {
    pub(super) fn new(entries: usize, max_chunks: usize) -> Self {
        let len = entries.div_ceil(max_chunks).max(MIN_CHUNK_ENTRIES);
        Self {
            len,
            count: entries.div_ceil(len),
        }
    }
}

/// Maps every entry's global expert id to its local expert, or to `num_local` when the
/// entry is dropped (id out of `0..num_experts`, or mapped to -1), and counts the
/// entries of each chunk per local expert into `counts[chunk * num_local + expert]`.
///
/// `expert_map` must already be checked: every entry -1 or in `0..num_local`.
pub(super) fn map_and_count(
    ids: ExpertIds<'_>,
    expert_map: Option<&[i32]>,
    num_experts: usize,
    num_local: usize,
    local_ids: &mut [i32],
    counts: &mut [u32],
    chunks: Chunks,
) {
    match ids {
        ExpertIds::I32(ids) => map_and_count_typed(
            ids,
            expert_map,
            num_experts,
            num_local,
            local_ids,
            counts,
            chunks,
        ),
        ExpertIds::I64(ids) => map_and_count_typed(
            ids,
            expert_map,
            num_experts,
            num_local,
            local_ids,
            counts,
            chunks,
        ),
    }
}

fn map_and_count_typed<I: Copy + Into<i64> + Sync>(
    ids: &[I],
    expert_map: Option<&[i32]>,
    num_experts: usize,
    num_local: usize,
    local_ids: &mut [i32],
    counts: &mut [u32],
    chunks: Chunks,
) {
    let dropped = num_local as i32;
    let to_local = |id: I| -> i32 {
        let id: i64 = id.into();
        if id < 0 || id >= num_experts as i64 {
            return dropped;
        }
        match expert_map {
            Some(map) if map[id as usize] < 0 => dropped,
            Some(map) => map[id as usize],
            None => id as i32,
        }
    };
    ids.par_chunks(chunks.len)
        .zip(local_ids[..ids.len()].par_chunks_mut(chunks.len))
        .zip(counts[..chunks.count * num_local].par_chunks_mut(num_local))
        .for_each(|((ids, local_ids), counts)| {
            counts.fill(0);
            for (&id, local) in ids.iter().zip(local_ids) {
                *local = to_local(id);
                if *local != dropped {
                    counts[*local as usize] += 1;
                }
            }
        });
}

/// Turns per-chunk counts into per-chunk write cursors, in place, with each expert's
/// group padded up to a multiple of `block_size` (1: no padding). Writes the first
/// row of each expert to `first_row[e]` and the total row count to
/// `first_row[num_local]`, and returns that total.
pub(super) fn scan(
    counts: &mut [u32],
    chunks: Chunks,
    num_local: usize,
    block_size: usize,
    first_row: &mut [i64],
) -> usize {
    let mut row = 0usize;
    for expert in 0..num_local {
        first_row[expert] = row as i64;
        let mut cursor = row;
        for chunk in 0..chunks.count {
            let count = &mut counts[chunk * num_local + expert];
            let n = *count as usize;
            *count = cursor as u32;
            cursor += n;
        }
        row += (cursor - row).next_multiple_of(block_size);
    }
    first_row[num_local] = row as i64;
    row
}

/// Gives each entry its row: calls `sink(f, Some(row))` for a kept entry, in
/// ascending `f` within each expert, and `sink(f, None)` for a dropped one. Rows of
/// distinct entries are distinct; chunks run in parallel.
pub(super) fn place<S>(
    local_ids: &[i32],
    cursors: &mut [u32],
    num_local: usize,
    chunks: Chunks,
    sink: S,
) where
    S: Fn(usize, Option<usize>) + Sync,
{
    local_ids
        .par_chunks(chunks.len)
        .zip(cursors[..chunks.count * num_local].par_chunks_mut(num_local))
        .enumerate()
        .for_each(|(chunk, (local_ids, cursors))| {
            let first = chunk * chunks.len;
            for (i, &local) in local_ids.iter().enumerate() {
                let row = cursors.get_mut(local as usize).map(|cursor| {
                    let row = *cursor;
                    *cursor += 1;
                    row as usize
                });
                sink(first + i, row);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_entry_without_empty_chunks() {
        for entries in [0, 1, 4095, 4096, 4097, 100_000, 1 << 20] {
            for max_chunks in [1, 3, 16, 64] {
                let chunks = Chunks::new(entries, max_chunks);
                assert!(chunks.count <= max_chunks.max(1), "{entries} {max_chunks}");
                assert!(chunks.count * chunks.len >= entries);
                assert!(entries == 0 || (chunks.count - 1) * chunks.len < entries);
            }
        }
    }
}

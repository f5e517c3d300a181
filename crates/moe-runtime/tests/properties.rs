//! Property tests of the CPU permute / unpermute / align against a naive reference
//! written here, from the contract alone (`moe-ops.md`), sharing no code with the library.
//!
//! The shapes, maps and ids come from proptest strategies (so a failure shrinks on
//! them); the bulk data (ids, hidden states, scales, weights) comes from a small seeded
//! RNG, so a failing case is reproduced by its printed parameters alone. Failures are
//! not persisted to a regressions file: the printed case is the record.

// The reference is written as plain index loops on purpose: it should read like the
// contract, not like an optimised implementation.
#![allow(clippy::needless_range_loop)]

use std::fmt::{Debug, Display};

use moe_runtime::cpu::UnpermuteInput;
use moe_runtime::cpu::{self, AlignOutput, PermuteDest, PermuteInput, PermuteOutput};
use moe_runtime::{
    Accumulate, Device, Element, F8E4M3, F8E5M2, PermuteScratch, Rows, RowsMut, Scales,
    ScratchConfig, TopkIds, bf16, f16,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// Configuration, RNG, element types
// ---------------------------------------------------------------------------------------

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(CASES)
    }
}

/// SplitMix64: tiny, deterministic, good enough for test data.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A finite, non-zero value with magnitude in `[0.01, max)` and a random sign.
    fn value(&mut self, max: f32) -> f32 {
        let magnitude = 0.01 + self.unit() * (max - 0.01);
        if self.chance(50) {
            -magnitude
        } else {
            magnitude
        }
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// An element type permute moves: built here from raw bits, never with library code.
trait TestElem: Element + Debug {
    /// The element whose bits are the low bits of `bits`.
    fn from_bits64(bits: u64) -> Self;
}

impl TestElem for f32 {
    fn from_bits64(bits: u64) -> Self {
        f32::from_bits(bits as u32)
    }
}
impl TestElem for f16 {
    fn from_bits64(bits: u64) -> Self {
        f16::from_bits(bits as u16)
    }
}
impl TestElem for bf16 {
    fn from_bits64(bits: u64) -> Self {
        bf16::from_bits(bits as u16)
    }
}
impl TestElem for F8E4M3 {
    fn from_bits64(bits: u64) -> Self {
        F8E4M3(bits as u8)
    }
}
impl TestElem for F8E5M2 {
    fn from_bits64(bits: u64) -> Self {
        F8E5M2(bits as u8)
    }
}

/// An element type unpermute sums: widened to f32 and narrowed back with the `half`
/// crate's round-to-nearest-even, as the contract says. (`Accumulate` is only the
/// bound the library's unpermute needs; the reference never calls it.)
trait Float: TestElem + Accumulate {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
    fn bits(self) -> u32;
}

impl Float for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(value: f32) -> Self {
        value
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}
impl Float for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
    fn bits(self) -> u32 {
        self.to_bits().into()
    }
}
impl Float for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(value: f32) -> Self {
        bf16::from_f32(value)
    }
    fn bits(self) -> u32 {
        self.to_bits().into()
    }
}

/// Random elements of any bit pattern except all-zero bytes (NaN payloads included:
/// permute must move bytes, not values).
fn random_elems<T: TestElem>(rng: &mut Rng, len: usize) -> Vec<T> {
    (0..len)
        .map(|_| {
            loop {
                let value = T::from_bits64(rng.next_u64());
                if bytemuck::bytes_of(&value).iter().any(|&b| b != 0) {
                    break value;
                }
            }
        })
        .collect()
}

/// Random finite, non-zero values of a float type.
fn random_floats<T: Float>(rng: &mut Rng, len: usize, max: f32) -> Vec<T> {
    (0..len).map(|_| T::narrow(rng.value(max))).collect()
}

fn random_scales(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.value(4.0)).collect()
}

/// The poison pattern of element `i` of a caller's destination.
fn poison_bits(i: usize) -> u64 {
    0xA5A5_A5A5_A5A5_A5A5 ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A NaN with a position-dependent payload: never produced by a copy of a scale.
fn poison_scale(i: usize) -> f32 {
    f32::from_bits(0x7FA0_0000 | (i as u32 & 0x000F_FFFF))
}

// ---------------------------------------------------------------------------------------
// Routing: parameters (shrinkable) and the data built from them
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MapKind {
    /// No expert_map (only when L == E; otherwise built as `Partition`).
    NoMap,
    /// Exactly L distinct globals map to a permutation of 0..L, the rest to -1.
    Partition,
    /// Every global maps to -1 or to any local id (duplicates, unused locals allowed).
    Arbitrary,
}

#[derive(Clone, Copy, Debug)]
enum IdMix {
    Valid,
    FewInvalid,
    HalfInvalid,
    AllInvalid,
    /// Almost every id among three "hot" globals: large groups, many empty experts.
    Hot,
}

#[derive(Clone, Debug)]
struct Params {
    n: usize,
    k: usize,
    e: usize,
    l: usize,
    map: MapKind,
    /// i64 ids (else i32).
    wide: bool,
    mix: IdMix,
    seed: u64,
}

#[derive(Clone, Debug)]
enum Ids {
    I32(Vec<i32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug)]
struct Routing {
    n: usize,
    k: usize,
    e: usize,
    l: usize,
    map: Option<Vec<i32>>,
    ids: Ids,
}

impl Routing {
    fn id(&self, f: usize) -> i64 {
        match &self.ids {
            Ids::I32(ids) => i64::from(ids[f]),
            Ids::I64(ids) => ids[f],
        }
    }

    /// The contract's validity rule, read literally.
    fn local_expert(&self, f: usize) -> Option<usize> {
        let id = self.id(f);
        if id < 0 || id >= self.e as i64 {
            return None;
        }
        match &self.map {
            None => Some(id as usize),
            Some(map) => {
                let local = map[id as usize];
                if local == -1 {
                    None
                } else {
                    Some(local as usize)
                }
            }
        }
    }

    fn topk_ids(&self) -> Result<TopkIds<'_>, TestCaseError> {
        let ids = match &self.ids {
            Ids::I32(ids) => TopkIds::new(ids, self.k),
            Ids::I64(ids) => TopkIds::new(ids, self.k),
        };
        lib(ids, "TopkIds::new")
    }
}

/// An id the contract calls invalid (negative or `>= E`). Among the i64 ones, some have
/// low 32 bits that are a valid id, or a negative i32: a truncating cast would keep them.
fn invalid_id(rng: &mut Rng, e: usize, wide: bool) -> i64 {
    let e64 = e as i64;
    match rng.below(if wide { 10 } else { 6 }) {
        0 => -1,
        1 => e64,
        2 => i64::from(i32::MIN),
        3 => i64::from(i32::MAX),
        4 => -1 - rng.below(1000) as i64,
        5 => e64 + rng.below(1000) as i64,
        6 => (1i64 << 32) + rng.below(e) as i64,
        7 => -(1i64 << 32) + rng.below(e) as i64,
        8 => {
            if rng.chance(50) {
                i64::MIN
            } else {
                i64::MAX
            }
        }
        _ => (1i64 << 31) + rng.below(e) as i64,
    }
}

fn build(p: &Params) -> Routing {
    let mut rng = Rng::new(p.seed);
    let kind = if p.l < p.e && p.map == MapKind::NoMap {
        MapKind::Partition
    } else {
        p.map
    };
    let map = match kind {
        MapKind::NoMap => None,
        MapKind::Partition => {
            let mut globals: Vec<usize> = (0..p.e).collect();
            rng.shuffle(&mut globals);
            let mut map = vec![-1i32; p.e];
            for (local, &global) in globals[..p.l].iter().enumerate() {
                map[global] = local as i32;
            }
            Some(map)
        }
        MapKind::Arbitrary => {
            let dropped = [10, 50, 90][rng.below(3)];
            Some(
                (0..p.e)
                    .map(|_| {
                        if rng.chance(dropped) {
                            -1
                        } else {
                            rng.below(p.l) as i32
                        }
                    })
                    .collect(),
            )
        }
    };
    let invalid = match p.mix {
        IdMix::Valid => 0,
        IdMix::FewInvalid => 10,
        IdMix::HalfInvalid => 50,
        IdMix::AllInvalid => 100,
        IdMix::Hot => 5,
    };
    let hot: Vec<usize> = (0..3).map(|_| rng.below(p.e)).collect();
    let raw: Vec<i64> = (0..p.n * p.k)
        .map(|_| {
            if rng.chance(invalid) {
                invalid_id(&mut rng, p.e, p.wide)
            } else if matches!(p.mix, IdMix::Hot) {
                hot[rng.below(hot.len())] as i64
            } else {
                rng.below(p.e) as i64
            }
        })
        .collect();
    let ids = if p.wide {
        Ids::I64(raw)
    } else {
        Ids::I32(
            raw.iter()
                .map(|&id| i32::try_from(id).expect("i32 ids are generated in range"))
                .collect(),
        )
    };
    Routing {
        n: p.n,
        k: p.k,
        e: p.e,
        l: p.l,
        map,
        ids,
    }
}

fn n_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        2 => Just(0usize),
        2 => Just(1usize),
        12 => 2..200usize,
        // Past 4096 entries the library cuts its index work into parallel chunks.
        4 => 200..4096usize,
    ]
}

/// `(K, E, L)`.
fn shape_strategy() -> impl Strategy<Value = (usize, usize, usize)> {
    (
        1..=8usize,
        prop_oneof![1..=4usize, 5..=64usize, 65..=512usize],
        0..3u8,
        any::<u64>(),
    )
        .prop_map(|(k, e, mode, pick)| {
            let l = if mode == 0 {
                e
            } else {
                1 + (pick % e as u64) as usize
            };
            (k, e, l)
        })
}

fn call_strategy(
    (k, e, l): (usize, usize, usize),
    n: impl Strategy<Value = usize>,
) -> impl Strategy<Value = Params> {
    (
        n,
        prop_oneof![
            Just(MapKind::NoMap),
            Just(MapKind::Partition),
            Just(MapKind::Arbitrary)
        ],
        any::<bool>(),
        prop_oneof![
            Just(IdMix::Valid),
            Just(IdMix::FewInvalid),
            Just(IdMix::HalfInvalid),
            Just(IdMix::AllInvalid),
            Just(IdMix::Hot)
        ],
        any::<u64>(),
    )
        .prop_map(move |(n, map, wide, mix, seed)| Params {
            n,
            k,
            e,
            l,
            map,
            wide,
            mix,
            seed,
        })
}

fn params_strategy() -> impl Strategy<Value = Params> {
    shape_strategy().prop_flat_map(|shape| call_strategy(shape, n_strategy()))
}

/// Two calls for one scratch: same `(K, E, L)`, the second with `N2 <= N1`.
fn two_calls_strategy() -> impl Strategy<Value = (Params, Params)> {
    shape_strategy()
        .prop_flat_map(|shape| {
            (
                call_strategy(shape, n_strategy()),
                call_strategy(shape, Just(0usize)),
                0..3u8,
                any::<u64>(),
            )
        })
        .prop_map(|(first, mut second, how, pick)| {
            second.n = match how {
                0 => first.n,
                1 => 0,
                _ => (pick % (first.n as u64 + 1)) as usize,
            };
            (first, second)
        })
}

fn hidden_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![6 => 1..=40usize, 1 => 41..=600usize]
}

/// Keeps `N * H` small enough for thousands of cases.
fn bounded_h(n: usize, h: usize) -> usize {
    h.min((24_000 / n.max(1)).max(1))
}

fn scale_columns_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), 1..=3usize]
}

// ---------------------------------------------------------------------------------------
// The reference
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct RefRouting {
    /// `groups[e]`: the entries of local expert `e`, ascending `f`.
    groups: Vec<Vec<usize>>,
    /// Valid entries in row order.
    order: Vec<usize>,
    valid: usize,
    offsets: Vec<i64>,
    inv: Vec<i32>,
    permuted_idx: Vec<i32>,
}

fn reference_routing(r: &Routing) -> RefRouting {
    let entries = r.n * r.k;
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); r.l];
    for f in 0..entries {
        if let Some(local) = r.local_expert(f) {
            groups[local].push(f);
        }
    }
    let mut order = Vec::new();
    let mut offsets = vec![0i64];
    for group in &groups {
        for &f in group {
            order.push(f);
        }
        offsets.push(order.len() as i64);
    }
    let valid = order.len();
    let mut inv = vec![entries as i32; entries];
    let mut permuted_idx = vec![entries as i32; entries];
    for row in 0..valid {
        inv[order[row]] = row as i32;
        permuted_idx[row] = order[row] as i32;
    }
    RefRouting {
        groups,
        order,
        valid,
        offsets,
        inv,
        permuted_idx,
    }
}

/// Every output of permute a test can predict.
#[derive(Debug)]
struct Expected {
    offsets: Vec<i64>,
    inv: Vec<i32>,
    permuted_idx: Vec<i32>,
    valid: usize,
    /// Bytes of rows `0..valid`.
    rows: Vec<u8>,
    /// Bits of scale rows `0..valid`.
    scales: Vec<u32>,
}

fn expected_permute(
    reference: &RefRouting,
    k: usize,
    source: &[u8],
    row_bytes: usize,
    scales: &[f32],
    columns: usize,
) -> Expected {
    let mut rows = Vec::new();
    let mut permuted_scales = Vec::new();
    for row in 0..reference.valid {
        let t = reference.order[row] / k;
        rows.extend_from_slice(&source[t * row_bytes..(t + 1) * row_bytes]);
        for c in 0..columns {
            permuted_scales.push(scales[t * columns + c].to_bits());
        }
    }
    Expected {
        offsets: reference.offsets.clone(),
        inv: reference.inv.clone(),
        permuted_idx: reference.permuted_idx.clone(),
        valid: reference.valid,
        rows,
        scales: permuted_scales,
    }
}

/// The contract's loop: ascending k, `acc += w * x` as a separate multiply and add.
fn reference_unpermute<T: Float>(
    permuted: &[T],
    h: usize,
    inv: &[i32],
    valid: usize,
    weights: &[f32],
    k: usize,
) -> Vec<T> {
    let n = inv.len() / k;
    let mut out = Vec::with_capacity(n * h);
    for t in 0..n {
        for j in 0..h {
            let mut acc = 0.0f32;
            for kk in 0..k {
                let f = t * k + kk;
                let row = inv[f];
                if row >= 0 && (row as usize) < valid {
                    let x = permuted[row as usize * h + j].widen();
                    let product = weights[f] * x;
                    acc += product;
                }
            }
            out.push(T::narrow(acc));
        }
    }
    out
}

/// `(sorted_ids, block_expert_ids, num_rows_post_padded)`.
fn reference_align(
    reference: &RefRouting,
    entries: usize,
    l: usize,
    b: usize,
) -> (Vec<i32>, Vec<i32>, usize) {
    let len = entries + entries.min(l) * (b - 1);
    let mut sorted = vec![entries as i32; len];
    let mut blocks = Vec::new();
    let mut start = 0;
    for expert in 0..l {
        let group = &reference.groups[expert];
        for i in 0..group.len() {
            sorted[start + i] = group[i] as i32;
        }
        let padded = group.len().div_ceil(b) * b;
        for _ in 0..padded / b {
            blocks.push(expert as i32);
        }
        start += padded;
    }
    let num_blocks = len.div_ceil(b);
    assert!(
        start <= len && blocks.len() <= num_blocks,
        "reference align overflow"
    );
    blocks.resize(num_blocks, -1);
    (sorted, blocks, start)
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

fn lib<T, E: Display>(result: Result<T, E>, what: &str) -> Result<T, TestCaseError> {
    result.map_err(|e| TestCaseError::fail(format!("{what} returned an error: {e}")))
}

fn same<T: PartialEq + Debug>(what: &str, got: &[T], expected: &[T]) -> Result<(), TestCaseError> {
    if got.len() != expected.len() {
        return Err(TestCaseError::fail(format!(
            "{what}: length {} expected {}",
            got.len(),
            expected.len()
        )));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        return Err(TestCaseError::fail(format!(
            "{what}[{i}]: got {:?}, expected {:?} (length {})",
            got[i],
            expected[i],
            got.len()
        )));
    }
    Ok(())
}

/// Byte-exact comparison reported by row.
fn same_rows(
    what: &str,
    got: &[u8],
    expected: &[u8],
    row_bytes: usize,
) -> Result<(), TestCaseError> {
    if got.len() != expected.len() {
        return Err(TestCaseError::fail(format!(
            "{what}: {} bytes, expected {}",
            got.len(),
            expected.len()
        )));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        let row = i / row_bytes;
        let bytes = row * row_bytes..(row + 1) * row_bytes;
        return Err(TestCaseError::fail(format!(
            "{what}: row {row} (of {}) differs at byte {}: got {:?}, expected {:?}",
            got.len() / row_bytes,
            i % row_bytes,
            &got[bytes.clone()],
            &expected[bytes]
        )));
    }
    Ok(())
}

fn bits_of_f32(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn bits_of<T: Float>(values: &[T]) -> Vec<u32> {
    values.iter().map(|&v| v.bits()).collect()
}

/// Every output of one permute call against the reference.
fn check_output<T: TestElem>(
    out: &PermuteOutput<'_>,
    expected: &Expected,
    h: usize,
    columns: usize,
) -> Result<(), TestCaseError> {
    let entries = expected.inv.len();
    let row_bytes = h * size_of::<T>();
    same(
        "expert_first_token_offset",
        out.expert_first_token_offset,
        &expected.offsets,
    )?;
    prop_assert_eq!(out.num_valid_rows(), expected.valid, "num_valid_rows");
    same("inv_permuted_idx", out.inv_permuted_idx, &expected.inv)?;
    same("permuted_idx", out.permuted_idx, &expected.permuted_idx)?;

    let rows = out.permuted_hidden_states;
    prop_assert_eq!(rows.dtype(), T::DTYPE);
    prop_assert_eq!(rows.hidden_size(), h);
    prop_assert_eq!(
        rows.as_bytes().len(),
        entries * row_bytes,
        "rows view bytes"
    );
    prop_assert_eq!(rows.num_rows(), entries, "rows view: N*K rows");
    match rows.as_slice::<T>() {
        Ok(slice) => prop_assert_eq!(slice.len(), entries * h, "as_slice length"),
        Err(e) => return Err(TestCaseError::fail(format!("as_slice: {e}"))),
    }
    same_rows(
        "permuted_hidden_states",
        &rows.as_bytes()[..expected.valid * row_bytes],
        &expected.rows,
        row_bytes,
    )?;

    match (out.permuted_scales, columns) {
        (None, 0) => {}
        (Some(scales), columns) if columns > 0 => {
            prop_assert_eq!(scales.columns(), columns);
            prop_assert_eq!(scales.num_rows(), entries, "scales view: N*K rows");
            let got = bits_of_f32(&scales.as_slice()[..expected.valid * columns]);
            same("permuted_scales", &got, &expected.scales)?;
        }
        (got, _) => {
            return Err(TestCaseError::fail(format!(
                "permuted_scales: got {:?} for {columns} scale columns",
                got.map(|s| s.columns())
            )));
        }
    }
    Ok(())
}

fn check_align(
    out: &AlignOutput<'_>,
    reference: &RefRouting,
    entries: usize,
    l: usize,
    b: usize,
) -> Result<(), TestCaseError> {
    let (sorted, blocks, padded) = reference_align(reference, entries, l, b);
    prop_assert_eq!(out.block_size, b);
    prop_assert_eq!(out.num_rows_post_padded, padded, "num_rows_post_padded");
    prop_assert_eq!(out.num_rows_post_padded % b, 0);
    same("sorted_ids", out.sorted_ids, &sorted)?;
    same("block_expert_ids", out.block_expert_ids, &blocks)?;
    Ok(())
}

fn make_input<'a, T: Element>(
    routing: &'a Routing,
    data: &'a [T],
    h: usize,
    scales: &'a [f32],
    columns: usize,
) -> Result<PermuteInput<'a>, TestCaseError> {
    let rows = lib(Rows::new(data, h), "Rows::new")?;
    let mut input = PermuteInput::new(rows, routing.topk_ids()?);
    if let Some(map) = &routing.map {
        input = input.with_expert_map(map);
    }
    if columns > 0 {
        input = input.with_scales(lib(Scales::new(scales, columns), "Scales::new")?);
    }
    Ok(input)
}

/// A call's random hidden states and scales, and what permute must make of them.
#[derive(Debug)]
struct Case<T> {
    routing: Routing,
    reference: RefRouting,
    data: Vec<T>,
    scales: Vec<f32>,
    expected: Expected,
}

fn make_case<T: TestElem>(p: &Params, h: usize, columns: usize, seed: u64) -> Case<T> {
    let routing = build(p);
    let reference = reference_routing(&routing);
    let mut rng = Rng::new(seed);
    let data: Vec<T> = random_elems(&mut rng, p.n * h);
    let scales = random_scales(&mut rng, p.n * columns);
    let expected = expected_permute(
        &reference,
        p.k,
        bytemuck::cast_slice(&data),
        h * size_of::<T>(),
        &scales,
        columns,
    );
    Case {
        routing,
        reference,
        data,
        scales,
        expected,
    }
}

// ---------------------------------------------------------------------------------------
// The properties, generic over the element type
// ---------------------------------------------------------------------------------------

fn permute_scratch_rows_case<T: TestElem>(
    p: &Params,
    h: usize,
    columns: usize,
    slack: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let h = bounded_h(p.n, h);
    let case = make_case::<T>(p, h, columns, seed);
    let config = ScratchConfig::new(p.n + slack, p.k, p.e, p.l, Device::Cpu)
        .with_rows(h, T::DTYPE)
        .with_scale_columns(columns);
    let mut scratch = lib(PermuteScratch::new(config), "PermuteScratch::new")?;
    let input = make_input(&case.routing, &case.data, h, &case.scales, columns)?;
    let out = lib(cpu::permute(&mut scratch, &input), "permute")?;
    check_output::<T>(&out, &case.expected, h, columns)
}

fn permute_into_case<T: TestElem>(
    p: &Params,
    h: usize,
    columns: usize,
    (slack, extra_rows): (usize, usize),
    seed: u64,
) -> Result<(), TestCaseError> {
    let h = bounded_h(p.n, h);
    let case = make_case::<T>(p, h, columns, seed);
    let config = ScratchConfig::new(p.n + slack, p.k, p.e, p.l, Device::Cpu);
    let mut scratch = lib(PermuteScratch::new(config), "PermuteScratch::new")?;
    permute_into_poisoned(&mut scratch, &case, h, columns, extra_rows)
}

/// permute_into a destination of `N*K + extra_rows` poisoned rows (and scales), then
/// every output and every byte of the destination.
fn permute_into_poisoned<T: TestElem>(
    scratch: &mut PermuteScratch,
    case: &Case<T>,
    h: usize,
    columns: usize,
    extra_rows: usize,
) -> Result<(), TestCaseError> {
    let entries = case.routing.n * case.routing.k;
    let total_rows = entries + extra_rows;
    let row_bytes = h * size_of::<T>();
    let poison_rows: Vec<T> = (0..total_rows * h)
        .map(|i| T::from_bits64(poison_bits(i)))
        .collect();
    let poison_scales: Vec<f32> = (0..total_rows * columns).map(poison_scale).collect();
    let mut dest_rows = poison_rows.clone();
    let mut dest_scales = poison_scales.clone();

    {
        let input = make_input(&case.routing, &case.data, h, &case.scales, columns)?;
        let dest = PermuteDest {
            hidden_states: lib(RowsMut::new(&mut dest_rows, h), "RowsMut::new")?,
            scales: if columns > 0 {
                Some(&mut dest_scales[..])
            } else {
                None
            },
        };
        let out = lib(cpu::permute_into(scratch, &input, dest), "permute_into")?;
        check_output::<T>(&out, &case.expected, h, columns)?;
    }

    // The caller's buffers themselves: rows before the valid count exact, every row at or
    // after it (the N*K view's tail and the slack past N*K) still poison.
    let valid = case.expected.valid;
    let got: &[u8] = bytemuck::cast_slice(&dest_rows);
    let poison: &[u8] = bytemuck::cast_slice(&poison_rows);
    same_rows(
        "destination rows before the valid count",
        &got[..valid * row_bytes],
        &case.expected.rows,
        row_bytes,
    )?;
    same_rows(
        "destination rows at/after the valid count (must stay unwritten)",
        &got[valid * row_bytes..],
        &poison[valid * row_bytes..],
        row_bytes,
    )?;
    let got_scales = bits_of_f32(&dest_scales);
    same(
        "destination scales before the valid count",
        &got_scales[..valid * columns],
        &case.expected.scales,
    )?;
    same(
        "destination scales at/after the valid count (must stay unwritten)",
        &got_scales[valid * columns..],
        &bits_of_f32(&poison_scales[valid * columns..]),
    )?;
    Ok(())
}

fn reused_scratch_case<T: TestElem>(
    (first, second): (&Params, &Params),
    h: usize,
    columns: usize,
    (slack, block): (usize, usize),
    seed: u64,
) -> Result<(), TestCaseError> {
    let h = bounded_h(first.n, h);
    let one = make_case::<T>(first, h, columns, seed);
    let two = make_case::<T>(second, h, columns, seed ^ 0xFFFF_0000_FFFF);
    let config = ScratchConfig::new(first.n + slack, first.k, first.e, first.l, Device::Cpu)
        .with_rows(h, T::DTYPE)
        .with_scale_columns(columns)
        .with_align_block_size(block);
    let mut scratch = lib(PermuteScratch::new(config), "PermuteScratch::new")?;

    let permute_and_align =
        |scratch: &mut PermuteScratch, case: &Case<T>, call: &str| -> Result<(), TestCaseError> {
            let input = make_input(&case.routing, &case.data, h, &case.scales, columns)?;
            let out = lib(cpu::permute(scratch, &input), "permute")?;
            check_output::<T>(&out, &case.expected, h, columns)
                .map_err(|e| TestCaseError::fail(format!("{call} permute: {e}")))?;
            let topk = case.routing.topk_ids()?;
            let out = lib(
                cpu::align(scratch, &topk, case.routing.map.as_deref()),
                "align",
            )?;
            let entries = case.routing.n * case.routing.k;
            check_align(&out, &case.reference, entries, case.routing.l, block)
                .map_err(|e| TestCaseError::fail(format!("{call} align: {e}")))
        };
    permute_and_align(&mut scratch, &one, "first call")?;
    permute_and_align(&mut scratch, &two, "second call (N2 <= N1)")?;
    permute_and_align(&mut scratch, &one, "third call (the first again)")?;
    permute_into_poisoned(&mut scratch, &two, h, columns, slack)
        .map_err(|e| TestCaseError::fail(format!("fourth call (permute_into, N2): {e}")))?;
    permute_and_align(&mut scratch, &two, "fifth call (N2 again)")?;
    Ok(())
}

fn allocating_permute_case<T: TestElem>(
    p: &Params,
    h: usize,
    columns: usize,
    slack: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let h = bounded_h(p.n, h);
    let case = make_case::<T>(p, h, columns, seed);
    let input = make_input(&case.routing, &case.data, h, &case.scales, columns)?;
    let owned = lib(
        cpu::allocating::permute(&input, p.e, p.l),
        "allocating::permute",
    )?;
    let alloc = owned.output().unwrap();
    check_output::<T>(&alloc, &case.expected, h, columns)
        .map_err(|e| TestCaseError::fail(format!("allocating::permute: {e}")))?;

    let config = ScratchConfig::new(p.n + slack, p.k, p.e, p.l, Device::Cpu)
        .with_rows(h, T::DTYPE)
        .with_scale_columns(columns);
    let mut scratch = lib(PermuteScratch::new(config), "PermuteScratch::new")?;
    let with_scratch = lib(cpu::permute(&mut scratch, &input), "permute")?;
    let valid = with_scratch.num_valid_rows();
    let row_bytes = h * size_of::<T>();
    same(
        "offsets: alloc vs scratch",
        alloc.expert_first_token_offset,
        with_scratch.expert_first_token_offset,
    )?;
    same(
        "inv_permuted_idx: alloc vs scratch",
        alloc.inv_permuted_idx,
        with_scratch.inv_permuted_idx,
    )?;
    same(
        "permuted_idx: alloc vs scratch",
        alloc.permuted_idx,
        with_scratch.permuted_idx,
    )?;
    same_rows(
        "rows: alloc vs scratch",
        &alloc.permuted_hidden_states.as_bytes()[..valid * row_bytes],
        &with_scratch.permuted_hidden_states.as_bytes()[..valid * row_bytes],
        row_bytes,
    )?;
    if columns > 0 {
        let (Some(a), Some(s)) = (alloc.permuted_scales, with_scratch.permuted_scales) else {
            return Err(TestCaseError::fail("permuted_scales missing"));
        };
        same(
            "scales: alloc vs scratch",
            &bits_of_f32(&a.as_slice()[..valid * columns]),
            &bits_of_f32(&s.as_slice()[..valid * columns]),
        )?;
    }
    Ok(())
}

/// A router weight, never zero. Mode 0: uniform; 1: a few powers of two (short sums,
/// exact ties when narrowing); 2: subnormal, so that products underflow to +-0 and the
/// sign of a zero sum shows whether the accumulator starts at +0.0; 3: any of these.
fn random_weight(rng: &mut Rng, mode: usize) -> f32 {
    let mode = if mode == 3 { rng.below(3) } else { mode };
    let sign = if rng.chance(50) { -1.0 } else { 1.0 };
    match mode {
        0 => rng.value(2.0),
        1 => sign * [0.125f32, 0.25, 0.5, 1.0, 2.0][rng.below(5)],
        _ => sign * f32::from_bits(1 + rng.below(16) as u32),
    }
}

/// A dropped entry's row as the contract allows it: any value `>= valid`.
fn dropped_row(rng: &mut Rng, valid: usize, entries: usize) -> i32 {
    match rng.below(4) {
        0 => entries as i32,
        1 => valid as i32,
        2 => (valid + 1 + rng.below(1000)) as i32,
        _ => i32::MAX,
    }
}

fn unpermute_case<T: Float>(
    p: &Params,
    h: usize,
    extra_rows: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let h = bounded_h(p.n, h);
    let routing = build(p);
    let reference = reference_routing(&routing);
    let (n, k) = (p.n, p.k);
    let entries = n * k;
    let valid = reference.valid;
    let mut rng = Rng::new(seed);

    // (a) Random expert outputs; rows past the valid count are NaN, so reading one shows.
    // Now and then values large enough for f16 sums to round to infinity.
    let max = if rng.chance(25) { 60_000.0 } else { 8.0 };
    let mut permuted: Vec<T> = random_floats(&mut rng, valid * h, max);
    permuted.extend((0..extra_rows * h).map(|_| T::narrow(f32::NAN)));
    let mode = rng.below(4);
    let weights: Vec<f32> = (0..entries)
        .map(|_| random_weight(&mut rng, mode))
        .collect();
    let inv: Vec<i32> = reference
        .inv
        .iter()
        .map(|&row| {
            if (row as usize) < valid {
                row
            } else {
                dropped_row(&mut rng, valid, entries)
            }
        })
        .collect();
    let input = UnpermuteInput {
        permuted_hidden_states: &permuted,
        hidden_size: h,
        inv_permuted_idx: &inv,
        expert_first_token_offset: &reference.offsets,
        topk_weights: &weights,
        topk: k,
    };
    let expected = bits_of(&reference_unpermute(&permuted, h, &inv, valid, &weights, k));
    let got = lib(cpu::allocating::unpermute(&input), "unpermute")?;
    same("unpermute", &bits_of(&got), &expected)?;

    let mut out: Vec<T> = random_floats(&mut rng, n * h, 100.0);
    lib(cpu::unpermute_into(&input, &mut out), "unpermute_into")?;
    same("unpermute_into", &bits_of(&out), &expected)?;

    for t in 0..n {
        if (0..k).all(|kk| inv[t * k + kk] as usize >= valid) {
            let row = &bits_of(&got[t * h..(t + 1) * h]);
            prop_assert!(
                row.iter().all(|&b| b == 0),
                "token {} has every entry dropped but got {:?}",
                t,
                row
            );
        }
    }

    // (b) Round trip: the library's own permute output feeds unpermute; the expected sum
    // reads the source rows directly.
    let hidden: Vec<T> = random_floats(&mut rng, n * h, max);
    let rows = lib(Rows::new(&hidden, h), "Rows::new")?;
    let mut permute_input = PermuteInput::new(rows, routing.topk_ids()?);
    if let Some(map) = &routing.map {
        permute_input = permute_input.with_expert_map(map);
    }
    let owned = lib(
        cpu::allocating::permute(&permute_input, p.e, p.l),
        "allocating::permute",
    )?;
    let permuted_out = owned.output().unwrap();
    let permuted_rows = lib(
        permuted_out.permuted_hidden_states.as_slice::<T>(),
        "as_slice",
    )?;
    let input = UnpermuteInput {
        permuted_hidden_states: permuted_rows,
        hidden_size: h,
        inv_permuted_idx: permuted_out.inv_permuted_idx,
        expert_first_token_offset: permuted_out.expert_first_token_offset,
        topk_weights: &weights,
        topk: k,
    };
    let mut expected = Vec::with_capacity(n * h);
    for t in 0..n {
        for j in 0..h {
            let mut acc = 0.0f32;
            for kk in 0..k {
                let f = t * k + kk;
                if routing.local_expert(f).is_some() {
                    let product = weights[f] * hidden[t * h + j].widen();
                    acc += product;
                }
            }
            expected.push(T::narrow(acc).bits());
        }
    }
    let got = lib(
        cpu::allocating::unpermute(&input),
        "unpermute after permute",
    )?;
    same("unpermute after permute", &bits_of(&got), &expected)?;
    Ok(())
}

fn align_case(p: &Params, block: usize, slack: usize) -> Result<(), TestCaseError> {
    let routing = build(p);
    let reference = reference_routing(&routing);
    let config =
        ScratchConfig::new(p.n + slack, p.k, p.e, p.l, Device::Cpu).with_align_block_size(block);
    let mut scratch = lib(PermuteScratch::new(config), "PermuteScratch::new")?;
    let topk = routing.topk_ids()?;
    let out = lib(
        cpu::align(&mut scratch, &topk, routing.map.as_deref()),
        "align",
    )?;
    let entries = p.n * p.k;
    prop_assert_eq!(
        out.sorted_ids.len(),
        entries + entries.min(p.l) * (block - 1),
        "sorted_ids length"
    );
    prop_assert_eq!(
        out.block_expert_ids.len(),
        out.sorted_ids.len().div_ceil(block),
        "block_expert_ids length"
    );
    check_align(&out, &reference, entries, p.l, block)
}

/// Runs a generic case for the element type numbered `dtype`.
macro_rules! for_dtype {
    ($dtype:expr, $case:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            0 => $case::<f32>($($arg),*),
            1 => $case::<f16>($($arg),*),
            2 => $case::<bf16>($($arg),*),
            3 => $case::<F8E4M3>($($arg),*),
            _ => $case::<F8E5M2>($($arg),*),
        }
    };
}

proptest! {
    #![proptest_config(config())]

    /// (1) permute into the scratch's own rows: every output against the reference.
    #[test]
    fn permute_with_scratch_rows_matches_reference(
        p in params_strategy(),
        h in hidden_strategy(),
        columns in scale_columns_strategy(),
        dtype in 0..5usize,
        slack in 0..=8usize,
        seed in any::<u64>(),
    ) {
        for_dtype!(dtype, permute_scratch_rows_case(&p, h, columns, slack, seed))?;
    }

    /// (2) permute into a poisoned caller destination: rows and scales at and after the
    /// valid count stay poison, the rest is exact.
    #[test]
    fn permute_into_leaves_rows_after_valid_unwritten(
        p in params_strategy(),
        h in hidden_strategy(),
        columns in scale_columns_strategy(),
        dtype in 0..5usize,
        slack in 0..=8usize,
        extra_rows in 0..=4usize,
        seed in any::<u64>(),
    ) {
        for_dtype!(dtype, permute_into_case(&p, h, columns, (slack, extra_rows), seed))?;
    }

    /// (3) One scratch, calls of N1, then N2 <= N1, then N1, then permute_into with N2,
    /// then N2 (permute and align interleaved): each call's answer is its own.
    #[test]
    fn reused_scratch_answers_each_call(
        (first, second) in two_calls_strategy(),
        h in hidden_strategy(),
        columns in scale_columns_strategy(),
        dtype in 0..5usize,
        slack in 0..=8usize,
        block in prop_oneof![Just(1usize), 1..=64usize],
        seed in any::<u64>(),
    ) {
        for_dtype!(dtype, reused_scratch_case((&first, &second), h, columns, (slack, block), seed))?;
    }

    /// (4) allocating::permute gives what the reference and the scratch version give.
    #[test]
    fn allocating_permute_matches_scratch_permute(
        p in params_strategy(),
        h in hidden_strategy(),
        columns in scale_columns_strategy(),
        dtype in 0..5usize,
        slack in 0..=8usize,
        seed in any::<u64>(),
    ) {
        for_dtype!(dtype, allocating_permute_case(&p, h, columns, slack, seed))?;
    }

    /// (5) unpermute is bit-identical to the contract's f32 loop, for f32, f16 and bf16.
    #[test]
    fn unpermute_matches_reference_loop_bitwise(
        p in params_strategy(),
        h in hidden_strategy(),
        dtype in 0..3usize,
        extra_rows in prop_oneof![Just(0usize), 1..=5usize],
        seed in any::<u64>(),
    ) {
        match dtype {
            0 => unpermute_case::<f32>(&p, h, extra_rows, seed)?,
            1 => unpermute_case::<f16>(&p, h, extra_rows, seed)?,
            _ => unpermute_case::<bf16>(&p, h, extra_rows, seed)?,
        }
    }

    /// (6) align: sorted_ids, block_expert_ids and num_rows_post_padded, with the lengths
    /// of the contract.
    #[test]
    fn align_matches_reference(
        p in params_strategy(),
        block in prop_oneof![Just(1usize), 1..=64usize],
        slack in 0..=8usize,
    ) {
        align_case(&p, block, slack)?;
    }
}

/// The reference itself, on an example worked by hand, and the library on it.
#[test]
fn reference_matches_a_hand_worked_example() {
    // N 3, K 2, E 4, L 2; globals 2 -> 0, 0 -> 1, 1 and 3 on another rank.
    let routing = Routing {
        n: 3,
        k: 2,
        e: 4,
        l: 2,
        map: Some(vec![1, -1, 0, -1]),
        ids: Ids::I64(vec![2, 0, 5, 2, -1, 0]),
    };
    let reference = reference_routing(&routing);
    assert_eq!(reference.offsets, [0, 2, 4]);
    assert_eq!(reference.inv, [0, 2, 6, 1, 6, 3]);
    assert_eq!(reference.permuted_idx, [0, 3, 1, 5, 6, 6]);
    let (sorted, blocks, padded) = reference_align(&reference, 6, 2, 2);
    assert_eq!(sorted, [0, 3, 1, 5, 6, 6, 6, 6]);
    assert_eq!(blocks, [0, 1, -1, -1]);
    assert_eq!(padded, 4);
    let (sorted, blocks, padded) = reference_align(&reference, 6, 2, 3);
    assert_eq!(sorted, [0, 3, 6, 1, 5, 6, 6, 6, 6, 6]);
    assert_eq!(blocks, [0, 1, -1, -1]);
    assert_eq!(padded, 6);

    let data = [10.0f32, 11.0, 20.0, 21.0, 30.0, 31.0];
    let input = make_input(&routing, &data, 2, &[], 0).unwrap();
    let owned = cpu::allocating::permute(&input, 4, 2).unwrap();
    let out = owned.output().unwrap();
    assert_eq!(out.expert_first_token_offset, [0, 2, 4]);
    assert_eq!(out.inv_permuted_idx, [0, 2, 6, 1, 6, 3]);
    assert_eq!(out.permuted_idx, [0, 3, 1, 5, 6, 6]);
    assert_eq!(
        &out.permuted_hidden_states.as_slice::<f32>().unwrap()[..8],
        [10.0, 11.0, 20.0, 21.0, 10.0, 11.0, 30.0, 31.0]
    );
    let weights = [0.5f32, 2.0, 7.0, 0.25, 9.0, -1.0];
    let sum = cpu::allocating::unpermute(&UnpermuteInput {
        permuted_hidden_states: out.permuted_hidden_states.as_slice::<f32>().unwrap(),
        hidden_size: 2,
        inv_permuted_idx: out.inv_permuted_idx,
        expert_first_token_offset: out.expert_first_token_offset,
        topk_weights: &weights,
        topk: 2,
    })
    .unwrap();
    assert_eq!(sum, [25.0, 27.5, 5.0, 5.25, -30.0, -31.0]);
}

//! A call with a scratch allocates nothing and returns views over the same memory.
//!
//! This binary installs a counting global allocator, so it holds a single test: any
//! other test running beside it would be counted too.
//!
//! What is counted is every allocation by any thread, rayon's included. rayon queues a
//! job submitted from outside its pool in a list of blocks, and allocates a new block
//! once every 63 such jobs; a job submitted from a pool thread goes to that thread's
//! own deque and allocates nothing. So calls large enough to run in parallel are
//! measured from inside the pool, as a serving stack whose executor runs on rayon
//! makes them, and calls small enough to run on the calling thread are measured from
//! an ordinary thread as well.
//!
//! rayon starts its pool lazily and each worker thread sets itself up in the
//! background, allocating as it goes (its FIFO job queue, crossbeam-epoch's handle on
//! its first steal, the thread-local destructor list). On a loaded machine a worker can
//! first run long after the pool started, inside a counted region: about 1 run in 50
//! failed that way on 2 busy cores, every counted allocation made by a worker thread.
//! So the test waits, before counting anything, until every worker has run a job.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use moe_runtime::cpu::{self, PermuteDest, PermuteInput, UnpermuteInput};
use moe_runtime::{
    DType, Device, PermuteScratch, Rows, RowsMut, Scales, ScratchConfig, TopkIds, bf16,
};

struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to the system allocator unchanged; counting touches
// only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's own guarantees.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's own guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's own guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's own guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn count() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Heap allocations made by any thread while `f` runs.
fn allocations_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let result = f();
    COUNTING.store(false, Ordering::SeqCst);
    (result, ALLOCATIONS.load(Ordering::SeqCst))
}

/// A small deterministic generator: inputs differ between calls, never all zeros.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn float(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 - 1.0
    }
}

struct Call {
    hidden: Vec<bf16>,
    ids: Vec<i64>,
    scales: Vec<f32>,
    weights: Vec<f32>,
}

const H: usize = 512;
const K: usize = 4;
const E: usize = 64;
const L: usize = 48;

fn call(rng: &mut Lcg, num_tokens: usize) -> Call {
    Call {
        hidden: (0..num_tokens * H)
            .map(|_| bf16::from_f32(rng.float()))
            .collect(),
        // Some ids out of range on purpose: dropped entries take the same path.
        ids: (0..num_tokens * K)
            .map(|_| rng.next() as i64 % (E as i64 + 2) - 1)
            .collect(),
        scales: (0..num_tokens).map(|_| rng.float()).collect(),
        weights: (0..num_tokens * K).map(|_| rng.float()).collect(),
    }
}

/// The addresses of every view a permute returned.
fn addresses(out: &cpu::PermuteOutput<'_>) -> [usize; 5] {
    [
        out.permuted_hidden_states.as_bytes().as_ptr() as usize,
        out.permuted_scales.unwrap().as_slice().as_ptr() as usize,
        out.expert_first_token_offset.as_ptr() as usize,
        out.inv_permuted_idx.as_ptr() as usize,
        out.permuted_idx.as_ptr() as usize,
    ]
}

/// Sizes the runtime handles on the calling thread without entering the pool.
const SERIAL_SIZES: [usize; 2] = [1, 7];
/// Sizes on both sides of the serial/parallel thresholds.
const ALL_SIZES: [usize; 5] = [1, 7, 300, 4096, 2000];

#[test]
fn calls_with_a_scratch_allocate_nothing_and_reuse_its_memory() {
    // Starts the pool and returns once every worker thread has run this job, which it
    // does only after its start-up and first steal: no worker is left to set itself
    // up (and allocate) while the calls below are counted.
    rayon::broadcast(|_| ());
    // From the test's own thread: small calls never touch rayon's queue.
    check_calls(&SERIAL_SIZES);
    // From a pool thread: calls of every size.
    rayon::scope(|_| check_calls(&ALL_SIZES));
}

fn check_calls(sizes: &[usize]) {
    let expert_map: Vec<i32> = (0..E as i32)
        .map(|e| if e < L as i32 { (e * 7) % L as i32 } else { -1 })
        .collect();
    let config = ScratchConfig::new(4096, K, E, L, Device::Cpu)
        .with_rows(H, DType::BF16)
        .with_scale_columns(1)
        .with_align_block_size(16);
    let mut scratch = PermuteScratch::new(config).unwrap();
    let mut rng = Lcg(0x5eed);
    let mut destination = vec![bf16::ZERO; 4096 * K * H];
    let mut destination_scales = vec![0.0f32; 4096 * K];
    let mut combined = vec![bf16::ZERO; 4096 * H];

    // Sizes on both sides of the serial/parallel threshold; the first round warms the
    // thread pool, whose start-up allocates.
    for round in 0..3 {
        let mut seen = None;
        for &num_tokens in sizes {
            let c = call(&mut rng, num_tokens);
            let input = PermuteInput::new(
                Rows::new(&c.hidden, H).unwrap(),
                TopkIds::new(&c.ids, K).unwrap(),
            )
            .with_expert_map(&expert_map)
            .with_scales(Scales::new(&c.scales, 1).unwrap());

            let (permuted, allocations) = allocations_during(|| {
                let out = cpu::permute(&mut scratch, &input).unwrap();
                let valid = out.num_valid_rows();
                let addresses = addresses(&out);
                let permuted = out.permuted_hidden_states.as_slice::<bf16>().unwrap();
                let unpermute = UnpermuteInput {
                    permuted_hidden_states: permuted,
                    hidden_size: H,
                    inv_permuted_idx: out.inv_permuted_idx,
                    expert_first_token_offset: out.expert_first_token_offset,
                    topk_weights: &c.weights,
                    topk: K,
                };
                cpu::unpermute_into(&unpermute, &mut combined[..num_tokens * H]).unwrap();
                (addresses, valid, out.permuted_idx[0])
            });
            let (addresses, valid, first_source) = permuted;
            if round > 0 {
                assert_eq!(allocations, 0, "permute + unpermute of {num_tokens} tokens");
            }
            // The calls did real work: the first valid row is its source token's row.
            if valid > 0 {
                let token = first_source as usize / K;
                let out = cpu::permute(&mut scratch, &input).unwrap();
                let rows = out.permuted_hidden_states.as_slice::<bf16>().unwrap();
                assert_eq!(&rows[..H], &c.hidden[token * H..(token + 1) * H]);
            }
            // Every call, of any size, returns views that start at the same addresses.
            assert_eq!(*seen.get_or_insert(addresses), addresses);

            let ((), allocations) = allocations_during(|| {
                let dest = PermuteDest {
                    hidden_states: RowsMut::new(&mut destination, H).unwrap(),
                    scales: Some(&mut destination_scales),
                };
                cpu::permute_into(&mut scratch, &input, dest).unwrap();
                let ids = TopkIds::new(&c.ids, K).unwrap();
                let aligned = cpu::align(&mut scratch, &ids, Some(&expert_map)).unwrap();
                assert_eq!(aligned.num_rows_post_padded % 16, 0);
            });
            if round > 0 {
                assert_eq!(
                    allocations, 0,
                    "permute_into + align of {num_tokens} tokens"
                );
            }
        }
    }
}

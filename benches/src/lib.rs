//! Benchmarks of moe-permute live in `benches/`; this library is empty.

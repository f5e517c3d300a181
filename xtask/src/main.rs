//! `cargo xtask`: the project's own build tasks.

fn main() -> anyhow::Result<()> {
    let task = std::env::args().nth(1);
    anyhow::bail!("unknown task {task:?}; available: build-ptx")
}

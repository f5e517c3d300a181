//! `cargo xtask tidy`: the checks that keep the documentation true to the code, in the
//! manner of rust-analyzer's tidy tests. They also run as tests of this crate, so
//! `cargo test --workspace` (CI) fails when the docs drift.
//!
//! - Every relative link in `README.md` and `docs/*.md` resolves to a file.
//! - Every constant the docs quote (the single-block routing limit, chunk and block
//!   sizes, the launch counts, the shared memory of the routing kernels, the CPU
//!   unpermute tile, the status block's size, the PTX ISA) is the code's value.
//! - Every library crate warns on an undocumented public item (and CI's clippy turns
//!   the warning into an error), and every Rust source file starts with a `//!` line
//!   saying what it is for.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Runs every check; the error lists every failure.
pub(crate) fn run(root: &Path) -> Result<()> {
    let mut failures = Vec::new();
    failures.extend(broken_links(root)?);
    failures.extend(stale_quotes(root)?);
    failures.extend(undocumented_sources(root)?);
    if failures.is_empty() {
        println!("tidy: docs and sources are consistent");
        return Ok(());
    }
    let mut report = String::from("tidy found problems:\n");
    for failure in &failures {
        let _ = writeln!(report, "  {failure}");
    }
    bail!(report)
}

/// The Markdown files whose links and quotes are checked.
fn markdown_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .context("reading docs/")?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    Ok(files)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The targets of the inline links `[text](target)` of a Markdown text, outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    targets
}

/// Relative links that name no file.
fn broken_links(root: &Path) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    for file in markdown_files(root)? {
        let text = read(&file)?;
        let dir = file.parent().unwrap_or(root);
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            if !dir.join(path).exists() {
                failures.push(format!(
                    "{}: the link to {target} resolves to no file",
                    relative(root, &file)
                ));
            }
        }
    }
    Ok(failures)
}

/// A value the docs quote: every occurrence of `before` in `file` must be followed by
/// `value` (numbers may carry thousands separators), and there must be at least one.
#[derive(Debug)]
struct Quote {
    file: &'static str,
    before: &'static str,
    value: String,
}

fn quote(file: &'static str, before: &'static str, value: impl ToString) -> Quote {
    Quote {
        file,
        before,
        value: value.to_string(),
    }
}

/// English for the small launch counts the docs spell out.
fn word(count: u32) -> &'static str {
    ["zero", "one", "two", "three", "four", "five", "six"]
        .get(count as usize)
        .copied()
        .unwrap_or("many")
}

/// Every quoted constant, with its value from the code.
fn quotes() -> Vec<Quote> {
    use moe_kernels::{
        FUSED_MAX_ENTRIES, MAX_LOCAL_EXPERTS, ROUTE_THREADS, ROUTE_WARPS, ROW_THREADS, STATUS_BYTES,
    };
    use moe_runtime::cuda::{
        MULTI_BLOCK_CHUNK, SCAN_IN_PLACE_ENTRIES, SINGLE_BLOCK_ENTRIES, route_launches,
    };

    // A permute is the routing launches and the row scatter.
    let small = word(route_launches(SINGLE_BLOCK_ENTRIES) + 1);
    let middle = word(route_launches(SINGLE_BLOCK_ENTRIES + 1) + 1);
    let large = word(route_launches(SCAN_IN_PLACE_ENTRIES + 1) + 1);
    vec![
        quote("docs/kernels.md", "A permute is ", small),
        quote("docs/kernels.md", "launches up to ", SINGLE_BLOCK_ENTRIES),
        quote("docs/kernels.md", "top-2) and ", middle),
        quote("docs/kernels.md", "above, up to ", SCAN_IN_PLACE_ENTRIES),
        quote("docs/kernels.md", "entries, then ", large),
        quote(
            "docs/kernels.md",
            "permute of up to ",
            SCAN_IN_PLACE_ENTRIES,
        ),
        quote("docs/kernels.md", "one, fused, up to ", FUSED_MAX_ENTRIES),
        quote(
            "docs/kernels.md",
            "at most `FUSED_MAX_ENTRIES` (",
            FUSED_MAX_ENTRIES,
        ),
        quote("docs/kernels.md", "chunks of ", MULTI_BLOCK_CHUNK),
        quote("docs/kernels.md", "**Grid**: blocks of ", ROUTE_THREADS),
        quote("docs/kernels.md", "threads (", ROUTE_WARPS),
        quote("docs/kernels.md", "blocks_per_row` blocks of ", ROW_THREADS),
        quote("docs/kernels.md", "so `L <= ", MAX_LOCAL_EXPERTS),
        quote("docs/kernels.md", "warps x ", MAX_LOCAL_EXPERTS),
        quote("docs/kernels.md", "**Resources**: ", route_shared_memory()),
        quote(
            "docs/kernels.md",
            "moe_kernels.ptx`, PTX ISA ",
            ptx_isa(moe_kernels::PTX),
        ),
        quote(
            "docs/kernels.md",
            "moe_kernels_sm90.ptx`, PTX ISA ",
            ptx_isa(moe_kernels::PTX_SM90),
        ),
        quote(
            "docs/benchmarks.md",
            "A permute of 129 to ",
            SINGLE_BLOCK_ENTRIES,
        ),
        quote("docs/benchmarks.md", "entries is ", small),
        quote("docs/benchmarks.md", "Above ", SCAN_IN_PLACE_ENTRIES),
        quote("docs/benchmarks.md", "entries a permute is ", large),
        quote("docs/decisions.md", "so up to ", SINGLE_BLOCK_ENTRIES),
        quote("docs/decisions.md", "entries one block of ", ROUTE_THREADS),
        quote(
            "docs/decisions.md",
            "threads counts, scans and places every entry in shared memory: ",
            small,
        ),
        quote("docs/decisions.md", "violation in a ", STATUS_BYTES),
        quote(
            "docs/architecture.md",
            "tile of ",
            moe_runtime::cpu::UNPERMUTE_TILE,
        ),
    ]
}

/// Bytes of the routing kernels' static shared memory, as the PTX declares them.
fn route_shared_memory() -> String {
    let ptx = moe_kernels::PTX;
    let declared = ptx
        .split("MOE_ROUTE_SMEM[")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap_or("?");
    declared.to_string()
}

/// The PTX ISA version of a committed module (`.version 7.8`).
fn ptx_isa(ptx: &str) -> String {
    ptx.lines()
        .find_map(|line| line.trim().strip_prefix(".version "))
        .unwrap_or("?")
        .trim()
        .to_string()
}

/// The number (digits, thousands separators, one decimal point) or word at the start of
/// `text`.
fn leading_value(text: &str) -> String {
    let mut value = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || ((c == ',' || c == '.') && !value.is_empty()) {
            value.push(c);
        } else {
            break;
        }
    }
    // A trailing separator is punctuation, not part of the number.
    while value.ends_with([',', '.']) {
        value.pop();
    }
    value
}

/// Quoted constants that disagree with the code, or that the docs no longer quote.
fn stale_quotes(root: &Path) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    for quote in quotes() {
        // Line breaks in Markdown are spaces: compare on normalised whitespace.
        let Ok(text) = std::fs::read_to_string(root.join(quote.file)) else {
            failures.push(format!("{}: missing (it quotes a constant)", quote.file));
            continue;
        };
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let before = quote
            .before
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let before = if quote.before.ends_with(char::is_whitespace) {
            before + " "
        } else {
            before
        };
        let found: Vec<String> = text
            .match_indices(&before)
            .map(|(at, _)| leading_value(&text[at + before.len()..]).replace(',', ""))
            .collect();
        if found.is_empty() {
            failures.push(format!(
                "{}: no longer quotes `{}{}` (update the quote in xtask/src/tidy.rs)",
                quote.file,
                quote.before.trim_end(),
                quote.value
            ));
        }
        for value in found.iter().filter(|value| **value != quote.value) {
            failures.push(format!(
                "{}: says \"{}{value}\", the code says {}",
                quote.file, quote.before, quote.value
            ));
        }
    }
    Ok(failures)
}

/// Library crates without `#![warn(missing_docs)]`, and Rust files without a leading
/// `//!` line.
fn undocumented_sources(root: &Path) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    for library in ["moe-kernels", "moe-runtime", "moe-experts"] {
        let lib = root.join("crates").join(library).join("src/lib.rs");
        if !read(&lib)?.contains("#![warn(missing_docs)]") {
            failures.push(format!(
                "{}: a library crate must warn on undocumented public items",
                relative(root, &lib)
            ));
        }
    }
    let mut sources = Vec::new();
    for dir in ["crates", "xtask", "benches", "compat"] {
        rust_files(&root.join(dir), &mut sources)?;
    }
    for file in sources {
        let text = read(&file)?;
        if !text.starts_with("//!") {
            failures.push(format!(
                "{}: does not start with a `//!` line saying what it is for",
                relative(root, &file)
            ));
        }
    }
    Ok(failures)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && name != "testdata" && !name.starts_with('.') {
                rust_files(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn every_relative_link_of_the_docs_resolves() {
        let failures = broken_links(&root()).unwrap();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn every_constant_the_docs_quote_is_the_codes() {
        let failures = stale_quotes(&root()).unwrap();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn every_library_documents_its_items_and_every_file_says_what_it_is() {
        let failures = undocumented_sources(&root()).unwrap();
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn the_checks_catch_what_they_are_for() {
        // A stale number, a missing quote, a broken link: each is reported.
        assert_eq!(leading_value("2,048 entries"), "2,048");
        assert_eq!(leading_value("two launches"), "two");
        assert_eq!(leading_value("7.8, sm_80"), "7.8");
        assert_eq!(leading_value("1024."), "1024");
        assert_eq!(
            link_targets("see [a](docs/a.md) and [b](#x)\n```\n[c](nope)\n```"),
            ["docs/a.md", "#x"]
        );
        let dir = std::env::temp_dir().join(format!("moe-tidy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("docs")).unwrap();
        std::fs::write(dir.join("README.md"), "[gone](docs/missing.md)").unwrap();
        std::fs::write(
            dir.join("docs/kernels.md"),
            "A permute is three launches up to 99 entries",
        )
        .unwrap();
        let links = broken_links(&dir).unwrap();
        assert_eq!(links.len(), 1, "{links:?}");
        let quotes = stale_quotes(&dir).unwrap();
        assert!(
            quotes.iter().any(|f| f.contains("\"A permute is three\"")),
            "{quotes:?}"
        );
        assert!(
            quotes.iter().any(|f| f.contains("\"launches up to 99\"")),
            "{quotes:?}"
        );
        assert!(
            quotes.iter().any(|f| f.contains("no longer quotes")),
            "{quotes:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Running `ptxas -v` on the PTX, reading its per-function report, and deciding.
//!
//! `ptxas -v` prints (on stderr), for each entry function and each device function an
//! entry calls:
//!
//! ```text
//! ptxas info    : Compiling entry function 'moe_test_tile_sum' for 'sm_80'
//! ptxas info    : Function properties for moe_test_tile_sum
//!     32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 20 registers, used 1 barriers, 32 bytes cumulative stack size, 4096 bytes smem, 372 bytes cmem[0]
//! ```
//!
//! [`parse`] turns that into [`FunctionStats`] rows, and [`problems`] decides: any error,
//! or any spill store or load, fails the build. Stack frames are reported, not judged.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::toolchain::{Ptxas, output};

/// What `ptxas -v` reported about one function for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FunctionStats {
    pub(crate) name: String,
    /// An entry function (a kernel) rather than a device function that one calls.
    pub(crate) entry: bool,
    /// Only entry functions get a `Used N registers` line.
    pub(crate) registers: Option<u32>,
    /// Static shared memory; `None` for device functions.
    pub(crate) smem_bytes: Option<u64>,
    pub(crate) stack_frame_bytes: u64,
    pub(crate) spill_store_bytes: u64,
    pub(crate) spill_load_bytes: u64,
}

impl FunctionStats {
    fn new(name: &str, entry: bool) -> Self {
        Self {
            name: name.to_owned(),
            entry,
            registers: None,
            smem_bytes: None,
            stack_frame_bytes: 0,
            spill_store_bytes: 0,
            spill_load_bytes: 0,
        }
    }

    fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// One `ptxas -v` run: one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    pub(crate) arch: String,
    /// Whether ptxas exited successfully.
    pub(crate) exit_ok: bool,
    /// In the order ptxas reports them; a device function that several entries call, once.
    pub(crate) functions: Vec<FunctionStats>,
    /// `error` and `fatal` lines, verbatim.
    pub(crate) errors: Vec<String>,
    /// `warning` lines, verbatim.
    pub(crate) warnings: Vec<String>,
}

/// Reads the text `ptxas -v` printed for `arch`.
pub(crate) fn parse(arch: &str, exit_ok: bool, text: &str) -> Report {
    let mut report = Report {
        arch: arch.to_owned(),
        exit_ok,
        functions: Vec::new(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    // The entry being compiled (its `Used ...` line comes last), and the function whose
    // `Function properties` line was just read.
    let mut entry: Option<usize> = None;
    let mut properties_of: Option<String> = None;

    for line in text.lines() {
        let Some((tag, message)) = line
            .strip_prefix("ptxas")
            .and_then(|rest| rest.split_once(':'))
        else {
            if let Some(name) = properties_of.take() {
                record_properties(&mut report, entry, &name, line);
            }
            continue;
        };
        properties_of = None;
        let message = message.trim();
        // `info`, `warning`, or `<file>, line 7; error`.
        match tag.split_whitespace().last().unwrap_or_default() {
            "error" | "fatal" => report.errors.push(line.trim().to_owned()),
            "warning" => report.warnings.push(line.trim().to_owned()),
            _ => {
                if let Some(rest) = message.strip_prefix("Compiling entry function '") {
                    let name = rest.split('\'').next().unwrap_or_default();
                    report.functions.push(FunctionStats::new(name, true));
                    entry = Some(report.functions.len() - 1);
                } else if let Some(name) = message.strip_prefix("Function properties for ") {
                    properties_of = Some(name.trim().to_owned());
                } else if message.starts_with("Used ") {
                    if let Some(index) = entry {
                        record_usage(&mut report.functions[index], message);
                    }
                }
            }
        }
    }
    report
}

/// `32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads` for `name`.
fn record_properties(report: &mut Report, entry: Option<usize>, name: &str, line: &str) {
    let index = match entry {
        Some(index) if report.functions[index].name == name => index,
        // A device function: ptxas lists it under every entry that calls it.
        _ => match report
            .functions
            .iter()
            .position(|f| !f.entry && f.name == name)
        {
            Some(index) => index,
            None => {
                report.functions.push(FunctionStats::new(name, false));
                report.functions.len() - 1
            }
        },
    };
    let stats = &mut report.functions[index];
    for part in line.split(',') {
        if let Some(bytes) = bytes_of(part, "stack frame") {
            stats.stack_frame_bytes = bytes;
        } else if let Some(bytes) = bytes_of(part, "spill stores") {
            stats.spill_store_bytes = bytes;
        } else if let Some(bytes) = bytes_of(part, "spill loads") {
            stats.spill_load_bytes = bytes;
        }
    }
}

/// `Used 20 registers, used 1 barriers, ..., 4096 bytes smem, 372 bytes cmem[0]`.
fn record_usage(stats: &mut FunctionStats, message: &str) {
    stats.smem_bytes = Some(0);
    for part in message.split(',') {
        if let Some(count) = part
            .trim()
            .strip_prefix("Used ")
            .and_then(|rest| rest.strip_suffix("registers"))
        {
            stats.registers = count.trim().parse().ok();
        } else if let Some(bytes) = bytes_of(part, "smem") {
            stats.smem_bytes = Some(bytes);
        }
    }
}

/// `N` from `N bytes <what>`.
fn bytes_of(part: &str, what: &str) -> Option<u64> {
    part.trim()
        .strip_suffix(what)?
        .trim_end()
        .strip_suffix("bytes")?
        .trim()
        .parse()
        .ok()
}

/// Why the PTX must not be used, one line each; empty when it is fine.
pub(crate) fn problems(reports: &[Report]) -> Vec<String> {
    let mut problems = Vec::new();
    for report in reports {
        if !report.exit_ok || !report.errors.is_empty() {
            let mut problem = format!("ptxas failed for {}", report.arch);
            for error in &report.errors {
                write!(problem, "\n      {error}").unwrap();
            }
            problems.push(problem);
        }
        for function in report.functions.iter().filter(|f| f.spills()) {
            problems.push(format!(
                "{} spills registers on {}: {} bytes spill stores, {} bytes spill loads \
                 ({} bytes stack frame)",
                function.name,
                report.arch,
                function.spill_store_bytes,
                function.spill_load_bytes,
                function.stack_frame_bytes,
            ));
        }
    }
    problems
}

/// The table of every kernel on every architecture, plus any device function that has a
/// stack frame or spills (the rest are the panic paths of `core`, and say nothing).
pub(crate) fn table(reports: &[Report]) -> String {
    let header = [
        "kernel",
        "arch",
        "registers",
        "smem bytes",
        "stack bytes",
        "spill st/ld bytes",
    ];
    // Kernels by name, each on every architecture in turn; then device functions.
    let mut listed: Vec<(&Report, &FunctionStats)> = reports
        .iter()
        .flat_map(|report| {
            report
                .functions
                .iter()
                .map(move |function| (report, function))
        })
        .filter(|(_, function)| {
            function.entry || function.stack_frame_bytes > 0 || function.spills()
        })
        .collect();
    listed.sort_by_key(|(_, function)| (!function.entry, &function.name));
    let or_dash = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let rows: Vec<[String; 6]> = listed
        .into_iter()
        .map(|(report, function)| {
            [
                if function.entry {
                    function.name.clone()
                } else {
                    format!("(device fn) {}", function.name)
                },
                report.arch.clone(),
                or_dash(function.registers.map(u64::from)),
                or_dash(function.smem_bytes),
                function.stack_frame_bytes.to_string(),
                format!(
                    "{}/{}",
                    function.spill_store_bytes, function.spill_load_bytes
                ),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "(no kernels in the module)\n".to_owned();
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: [&str; 6]| {
        let mut line = String::new();
        for (column, (cell, width)) in cells.iter().zip(widths).enumerate() {
            match column {
                0 => write!(line, "{cell:<width$}").unwrap(),
                1 => write!(line, "  {cell:<width$}").unwrap(),
                _ => write!(line, "  {cell:>width$}").unwrap(),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(header);
    for row in &rows {
        push_row(row.each_ref().map(String::as_str));
    }
    out
}

/// Runs `ptxas -v -arch=<arch>` on `ptx`, writing the cubin under `<root>/target/ptxas`.
pub(crate) fn run(ptxas: &Ptxas, root: &Path, ptx: &Path, arch: &str) -> Result<Report> {
    let out_dir = root.join("target/ptxas");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("could not create {}", out_dir.display()))?;
    let cubin = out_dir.join(format!("moe_kernels.{arch}.cubin"));
    let result = output(
        Command::new(&ptxas.path)
            .arg(format!("-arch={arch}"))
            .arg("-v")
            .arg(ptx)
            .arg("-o")
            .arg(&cubin),
    )?;
    let mut text = String::from_utf8_lossy(&result.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&result.stderr));
    let report = parse(arch, result.status.success(), &text);
    if !report.exit_ok {
        eprintln!(
            "ptxas -arch={arch} exited with {}; its output:\n{}",
            result.status,
            text.trim_end()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real `ptxas -v` output (CUDA 13.0.88): for two throwaway test kernels compiled by
    // `build-ptx` (shared memory, a stack frame, core's panic functions), for
    // `testdata/spill_demo.ptx` and for `testdata/bad.ptx`.
    const KERNELS_SM_80: &str = include_str!("testdata/ptxas_kernels_sm_80.txt");
    const KERNELS_SM_90: &str = include_str!("testdata/ptxas_kernels_sm_90.txt");
    const SPILL_SM_80: &str = include_str!("testdata/ptxas_spill_sm_80.txt");
    const ERROR_SM_80: &str = include_str!("testdata/ptxas_error_sm_80.txt");

    const PANIC_FMT: &str = "_RNvNtCsanIojcP8aaR_4core9panicking9panic_fmt";

    fn kernel(name: &str, registers: u32, smem: u64, stack: u64) -> FunctionStats {
        FunctionStats {
            registers: Some(registers),
            smem_bytes: Some(smem),
            stack_frame_bytes: stack,
            ..FunctionStats::new(name, true)
        }
    }

    fn device_fn(name: &str) -> FunctionStats {
        FunctionStats::new(name, false)
    }

    #[test]
    fn parses_kernels_without_spills() {
        let report = parse("sm_80", true, KERNELS_SM_80);
        // In the order ptxas reports them; a device function called by both kernels once.
        assert_eq!(
            report.functions,
            [
                kernel("moe_test_tile_sum", 20, 4096, 32),
                device_fn("_RNvNtCsanIojcP8aaR_4core6result13unwrap_failed"),
                device_fn(PANIC_FMT),
                kernel("moe_test_count", 8, 0, 0),
                device_fn("_RNvNtCsanIojcP8aaR_4core9panicking18panic_bounds_check"),
            ]
        );
        assert!(report.errors.is_empty() && report.warnings.is_empty());
        assert!(problems(&[report]).is_empty());
    }

    #[test]
    fn sm_90_reports_have_no_cmem_but_the_same_shape() {
        let report = parse("sm_90", true, KERNELS_SM_90);
        let kernels: Vec<_> = report.functions.iter().filter(|f| f.entry).collect();
        assert_eq!(
            kernels,
            [
                &kernel("moe_test_tile_sum", 20, 4096, 32),
                &kernel("moe_test_count", 8, 0, 0)
            ]
        );
        assert!(problems(&[report]).is_empty());
    }

    #[test]
    fn parses_and_rejects_spills() {
        let report = parse("sm_80", true, SPILL_SM_80);
        assert_eq!(
            report.functions,
            [FunctionStats {
                spill_store_bytes: 92,
                spill_load_bytes: 92,
                ..kernel("spill_demo", 24, 0, 96)
            }]
        );
        assert_eq!(
            report.warnings,
            [
                "ptxas warning : For entry spill_demo adjusting per thread register count of 16 \
              to lower bound of 24"
            ]
        );
        assert_eq!(
            problems(&[report]),
            [
                "spill_demo spills registers on sm_80: 92 bytes spill stores, 92 bytes spill \
              loads (96 bytes stack frame)"
            ]
        );
    }

    #[test]
    fn rejects_errors() {
        let report = parse("sm_80", false, ERROR_SM_80);
        assert!(report.functions.is_empty());
        assert_eq!(report.errors.len(), 3);
        assert_eq!(
            problems(&[report]),
            ["ptxas failed for sm_80\n      \
              ptxas bad.ptx, line 7; error   : Arguments mismatch for instruction 'mov'\n      \
              ptxas bad.ptx, line 7; error   : Unknown symbol '%r1'\n      \
              ptxas fatal   : Ptx assembly aborted due to errors"]
        );
    }

    #[test]
    fn a_failed_exit_is_an_error_even_without_error_lines() {
        let report = parse("sm_90", false, "");
        assert_eq!(problems(&[report]), ["ptxas failed for sm_90"]);
    }

    #[test]
    fn a_spill_in_a_device_function_counts() {
        let text = "\
ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 380 bytes cmem[0]
ptxas info    : Function properties for helper
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
";
        let report = parse("sm_80", true, text);
        assert_eq!(
            problems(&[report]),
            [
                "helper spills registers on sm_80: 8 bytes spill stores, 4 bytes spill loads \
              (16 bytes stack frame)"
            ]
        );
    }

    #[test]
    fn table_lists_kernels_and_device_functions_worth_seeing() {
        let reports = [
            parse("sm_80", true, KERNELS_SM_80),
            parse("sm_80", true, SPILL_SM_80),
        ];
        assert_eq!(
            table(&reports),
            "\
kernel             arch   registers  smem bytes  stack bytes  spill st/ld bytes
moe_test_count     sm_80          8           0            0                0/0
moe_test_tile_sum  sm_80         20        4096           32                0/0
spill_demo         sm_80         24           0           96              92/92
"
        );
        assert_eq!(table(&[]), "(no kernels in the module)\n");
    }
}

//! The benchmark's table and plot.

use std::fmt::Write;

use super::{Report, Row};

fn gb_per_s(row: &Row) -> f64 {
    row.bytes as f64 / (row.scratch_us * 1e3)
}

/// The table, as Markdown, on stdout.
pub(crate) fn print_table(report: &Report) {
    println!("device: {} ({})", report.device, report.card);
    println!(
        "copy bandwidth: {:.0} GB/s (read + write)",
        report.copy_gb_per_s
    );
    println!("method: {}", report.method);
    println!();
    println!(
        "| shape | N | op | scratch us | alloc us | alloc / scratch | GB/s | % copy bw | eager scratch / alloc us |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for row in &report.rows {
        let alloc = row.alloc_us.map_or("-".into(), |a| format!("{a:.1}"));
        let speedup = row
            .alloc_us
            .map_or("-".into(), |a| format!("{:.2}", a / row.scratch_us));
        let (rate, share) = if row.bytes > 0 {
            let rate = gb_per_s(row);
            (
                format!("{rate:.0}"),
                format!("{:.0}", 100.0 * rate / report.copy_gb_per_s),
            )
        } else {
            ("-".into(), "-".into())
        };
        let eager = match (row.eager_scratch_us, row.eager_alloc_us) {
            (Some(s), Some(a)) => format!("{s:.1} / {a:.1}"),
            (Some(s), None) => format!("{s:.1}"),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {:.1} | {alloc} | {speedup} | {rate} | {share} | {eager} |",
            row.shape, row.tokens, row.op, row.scratch_us
        );
    }
}

const COLORS: [&str; 3] = ["#1f77b4", "#d62728", "#2ca02c"];

/// Percent of copy bandwidth against tokens (log scale), permute and unpermute side by
/// side, one line per shape, with the project's targets dashed.
pub(crate) fn svg(report: &Report) -> String {
    let (width, height) = (960.0, 420.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="14">moe bench on {} ({}): % of copy bandwidth ({:.0} GB/s), reused scratch</text>"#,
        width / 2.0,
        report.card,
        report.device,
        report.copy_gb_per_s
    );
    let shapes: Vec<&str> = {
        let mut names: Vec<&str> = report.rows.iter().map(|r| r.shape).collect();
        names.dedup();
        names
    };
    let max_tokens = report
        .rows
        .iter()
        .map(|r| r.tokens)
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    for (panel, (op, target)) in [("permute", 85.0), ("unpermute", 95.0)].iter().enumerate() {
        let (left, top, w, h) = (60.0 + panel as f64 * 470.0, 50.0, 400.0, 320.0);
        let x = |tokens: f64| left + w * tokens.max(1.0).ln() / max_tokens.ln();
        let y = |percent: f64| top + h - h * percent.clamp(0.0, 110.0) / 110.0;
        let _ = writeln!(
            out,
            r##"<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{op}</text>"#,
            left + w / 2.0,
            top - 8.0
        );
        for percent in [0.0, 25.0, 50.0, 75.0, 100.0] {
            let _ = writeln!(
                out,
                r##"<line x1="{left}" x2="{right}" y1="{at}" y2="{at}" stroke="#eee"/><text x="{label_x}" y="{label_y}" text-anchor="end">{percent}%</text>"##,
                right = left + w,
                at = y(percent),
                label_x = left - 4.0,
                label_y = y(percent) + 4.0
            );
        }
        let _ = writeln!(
            out,
            r##"<line x1="{left}" x2="{right}" y1="{at}" y2="{at}" stroke="#555" stroke-dasharray="4 4"/><text x="{label_x}" y="{label_y}" fill="#555" text-anchor="end">target {target}%</text>"##,
            right = left + w,
            at = y(*target),
            // At the right end, clear of the legend at the top left.
            label_x = left + w - 6.0,
            label_y = y(*target) + 14.0
        );
        let mut tokens = 1.0;
        while tokens <= max_tokens {
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{tokens}</text>"#,
                x(tokens),
                top + h + 16.0
            );
            tokens *= 4.0;
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">tokens</text>"#,
            left + w / 2.0,
            top + h + 32.0
        );
        for (i, shape) in shapes.iter().enumerate() {
            let points: Vec<String> = report
                .rows
                .iter()
                .filter(|r| r.op == *op && r.shape == *shape && r.bytes > 0)
                .map(|r| {
                    let percent = 100.0 * gb_per_s(r) / report.copy_gb_per_s;
                    format!("{:.1},{:.1}", x(r.tokens as f64), y(percent))
                })
                .collect();
            let color = COLORS[i % COLORS.len()];
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                points.join(" ")
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" fill="{color}">{shape}</text>"#,
                left + 8.0,
                top + 16.0 + 15.0 * i as f64
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

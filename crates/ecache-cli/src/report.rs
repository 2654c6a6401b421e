//! Study reports: `results.json`, a markdown table, and one SVG line plot per metric,
//! drawn with `plotters` (SVG backend only: no system fonts or image libraries needed).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::eval::{EvalRow, table, write_atomically};

/// A metric of the rows, its file stem and axis label.
pub struct MetricView {
    pub stem: &'static str,
    pub label: &'static str,
    pub value: fn(&EvalRow) -> Option<f64>,
}

/// The four metrics of a study.
pub const METRICS: [MetricView; 4] = [
    MetricView {
        stem: "ppl",
        label: "PPL of the reference answers (lower is better)",
        value: |r| r.ppl,
    },
    MetricView {
        stem: "rouge_vs_full",
        label: "ROUGE-L F1 against the full cache's output",
        value: |r| r.rouge_l,
    },
    MetricView {
        stem: "exact",
        label: "short questions answered exactly",
        value: |r| r.exact,
    },
    MetricView {
        stem: "rouge_vs_reference",
        label: "description ROUGE-L F1 against the ground truth",
        value: |r| r.rouge_truth,
    },
];

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A series named like another plus this suffix is that policy under pyramid layer
/// budgets: drawn as triangles in the other's colour, without a line.
pub const PYRAMID_SUFFIX: &str = " pyramid";

/// Draws one line per series; a series with a single point is drawn as a dashed
/// horizontal reference line across the plot (the full cache); a series whose name is
/// another's plus [`PYRAMID_SUFFIX`] as triangles in that one's colour.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if points.is_empty() {
        return Ok(());
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| {
        points.iter().map(pick).fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::MAX, |p| p.0),
        fold(f64::max, f64::MIN, |p| p.0),
    );
    let (y0, y1) = (
        fold(f64::min, f64::MAX, |p| p.1),
        fold(f64::max, f64::MIN, |p| p.1),
    );
    let pad = ((y1 - y0) * 0.08).max(1e-3);
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 0.5, x1 + 0.5)
    };
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    let lines: Vec<&String> = series
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !n.ends_with(PYRAMID_SUFFIX))
        .collect();
    for (name, pts) in series {
        let base = name.strip_suffix(PYRAMID_SUFFIX).unwrap_or(name);
        let i = lines.iter().position(|n| *n == base).unwrap_or(lines.len());
        let colour = PALETTE[i % PALETTE.len()];
        let style = ShapeStyle::from(&colour).stroke_width(2);
        if name.ends_with(PYRAMID_SUFFIX) {
            chart
                .draw_series(
                    pts.iter()
                        .map(|&p| TriangleMarker::new(p, 6, colour.filled())),
                )
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| TriangleMarker::new((x + 9, y), 5, colour.filled()));
        } else if pts.len() == 1 {
            let y = pts[0].1;
            let dashes: Vec<f64> = (0..40).map(|k| x0 + (x1 - x0) * k as f64 / 40.0).collect();
            for pair in dashes.chunks(2) {
                let end = pair.get(1).copied().unwrap_or(x1);
                chart
                    .draw_series(LineSeries::new(vec![(pair[0], y), (end, y)], style))
                    .map_err(|e| err(&e))?;
            }
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x0, y), (x0, y)],
                    style,
                )))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        } else {
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(if y_label.contains("lower is better") {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        })
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `results.json`, `results.md` and one plot per metric into `dir`. `x` picks each
/// row's abscissa and `line` the series it belongs to.
pub fn write_study(
    dir: &Path,
    title: &str,
    x_label: &str,
    rows: &[EvalRow],
    x: impl Fn(&EvalRow) -> f64,
    line: impl Fn(&EvalRow) -> String,
    preamble: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::BadInput(format!("cannot create {}: {e}", dir.display())))?;
    write_atomically(
        &dir.join("results.json"),
        &(serde_json::to_string_pretty(rows)? + "\n"),
    )?;
    let mut md = format!("# {title}\n\n{preamble}\n\n{}", table(rows));
    for m in &METRICS {
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for r in rows {
            let Some(v) = (m.value)(r) else { continue };
            let name = line(r);
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push((x(r), v)),
                None => series.push((name, vec![(x(r), v)])),
            }
        }
        if series.is_empty() {
            continue;
        }
        for (_, pts) in &mut series {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let file = format!("{}.svg", m.stem);
        line_plot(&dir.join(&file), title, x_label, m.label, &series)?;
        md += &format!("\n![{}]({file})\n", m.label);
    }
    write_atomically(&dir.join("results.md"), &md)
}

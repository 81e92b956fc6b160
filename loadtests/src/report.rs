//! Run reports: a Markdown summary and a self-contained HTML page with SVG charts (latency
//! percentiles over time, outcome mix over time, the fault timeline), drawn with plotters.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::driver::LoadResult;

/// A fault applied at a time, for the timeline and the charts' markers.
#[derive(Debug, Clone)]
pub struct Marker {
    pub at_s: f64,
    pub label: String,
}

fn chart_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("chart: {e:?}")
}

/// Latency p50/p99/max per second, with fault markers.
pub fn latency_svg(result: &LoadResult, markers: &[Marker]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let secs = result.seconds.len().max(1) as f64;
        let series = |q: f64| -> Vec<(f64, f64)> {
            result
                .seconds
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.latency.is_empty())
                .map(|(i, s)| {
                    (
                        i as f64 + 0.5,
                        s.latency.value_at_quantile(q) as f64 / 1000.0,
                    )
                })
                .collect()
        };
        let p50 = series(0.5);
        let p99 = series(0.99);
        let p999 = series(0.999);
        let top = p999.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("latency per second (ms)", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..secs, 0f64..top)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("ms")
            .draw()
            .map_err(chart_err)?;
        for (data, color, name) in [
            (p50, BLUE, "p50"),
            (p99, RED, "p99"),
            (p999, MAGENTA, "p99.9"),
        ] {
            chart
                .draw_series(LineSeries::new(data, color.stroke_width(2)))
                .map_err(chart_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        draw_markers(&mut chart, markers, top)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

/// Responses per second by outcome (ai, fallback, error), stacked.
pub fn outcomes_svg(result: &LoadResult, markers: &[Marker]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_err)?;
        let secs = result.seconds.len().max(1) as f64;
        let count = |s: &crate::driver::Second, k: &str| {
            s.counts.outcome.get(k).copied().unwrap_or(0) as f64
        };
        let top = result
            .seconds
            .iter()
            .map(|s| s.counts.requests as f64)
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption("responses per second by outcome", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..secs, 0f64..top)
            .map_err(chart_err)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("req/s")
            .draw()
            .map_err(chart_err)?;
        // Stacked: ai at the bottom, then fallback, then errors (incl. transport errors).
        let layers: [(&str, RGBColor); 3] = [
            ("ai", GREEN),
            ("fallback", RGBColor(255, 165, 0)),
            ("error", RED),
        ];
        for (i, (name, color)) in layers.iter().enumerate().rev() {
            let data: Vec<(f64, f64)> = result
                .seconds
                .iter()
                .enumerate()
                .map(|(t, s)| {
                    let mut v = 0.0;
                    for (k, _) in &layers[..=i] {
                        v += count(s, k);
                        if *k == "error" {
                            v += s.counts.errors as f64 + count(s, "none");
                        }
                    }
                    (t as f64 + 0.5, v)
                })
                .collect();
            let color = *color;
            chart
                .draw_series(AreaSeries::new(data, 0.0, color.mix(0.6)).border_style(color))
                .map_err(chart_err)?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.filled())
                });
        }
        draw_markers(&mut chart, markers, top)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(chart_err)?;
        root.present().map_err(chart_err)?;
    }
    Ok(svg)
}

fn draw_markers<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    markers: &[Marker],
    top: f64,
) -> anyhow::Result<()> {
    for m in markers {
        chart
            .draw_series(LineSeries::new(
                vec![(m.at_s, 0.0), (m.at_s, top)],
                BLACK.stroke_width(1),
            ))
            .map_err(|e| anyhow::anyhow!("chart: {e:?}"))?;
        chart
            .draw_series(std::iter::once(Text::new(
                m.label.clone(),
                (m.at_s, top * 0.95),
                ("sans-serif", 12),
            )))
            .map_err(|e| anyhow::anyhow!("chart: {e:?}"))?;
    }
    Ok(())
}

/// Writes `<stem>.md` and `<stem>.html` (self-contained) and returns the Markdown.
pub fn write(
    dir: &Path,
    stem: &str,
    title: &str,
    summary_md: &str,
    result: &LoadResult,
    markers: &[Marker],
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let mut md = format!("# {title}\n\n{summary_md}\n\n## Per second\n\n| s | requests | ai | fallback | error | transport errors | p50 ms | p99 ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, s) in result.seconds.iter().enumerate() {
        let get = |k: &str| s.counts.outcome.get(k).copied().unwrap_or(0);
        let q = |q: f64| {
            if s.latency.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3}", s.latency.value_at_quantile(q) as f64 / 1000.0)
            }
        };
        let _ = writeln!(
            md,
            "| {i} | {} | {} | {} | {} | {} | {} | {} |",
            s.counts.requests,
            get("ai"),
            get("fallback"),
            get("error"),
            s.counts.errors,
            q(0.5),
            q(0.99)
        );
    }
    if !markers.is_empty() {
        md.push_str("\n## Fault timeline\n\n");
        for m in markers {
            let _ = writeln!(md, "- t={:.1}s: {}", m.at_s, m.label);
        }
    }
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}pre{{background:#f4f4f4;padding:8px;white-space:pre-wrap}}</style></head><body><h1>{title}</h1><pre>{}</pre>{}{}</body></html>",
        html_escape(summary_md),
        latency_svg(result, markers)?,
        outcomes_svg(result, markers)?
    );
    std::fs::write(dir.join(format!("{stem}.md")), &md)?;
    std::fs::write(dir.join(format!("{stem}.html")), html)?;
    Ok(md)
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

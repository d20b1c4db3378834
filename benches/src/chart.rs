//! The run as an SVG chart: output tokens/s (left) and TTFT p50/p99 (right) against the
//! load, one colour per target.

use std::path::Path;

use plotters::prelude::*;

use crate::runner::{LevelResult, Load};

const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// One target's points: `(load, value)`.
type Series = Vec<(f64, f64)>;

pub fn write_svg(path: &Path, levels: &[LevelResult]) -> Result<(), String> {
    let mut targets: Vec<&str> = Vec::new();
    for l in levels {
        if !targets.contains(&l.target.url.as_str()) {
            targets.push(&l.target.url);
        }
    }
    let series = |f: &dyn Fn(&LevelResult) -> f64| -> Vec<Series> {
        targets
            .iter()
            .map(|t| {
                levels
                    .iter()
                    .filter(|l| l.target.url == *t)
                    .map(|l| (l.load.x(), f(l)))
                    .collect()
            })
            .collect()
    };
    let tokens = series(&|l| l.summary.output_tokens_per_s);
    let ttft50 = series(&|l| l.summary.ttft_ms.p50 / 1e3);
    let ttft99 = series(&|l| l.summary.ttft_ms.p99 / 1e3);
    let x_label = match levels.first().map(|l| l.load) {
        Some(Load::RequestRate(_)) => "request rate (req/s)",
        _ => "concurrent streams",
    };

    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(550);
    let names: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    panel(
        &left,
        "output tokens/s",
        x_label,
        &[(&tokens, "", false)],
        &names,
    )?;
    panel(
        &right,
        "TTFT (s)",
        x_label,
        &[(&ttft50, " p50", false), (&ttft99, " p99", true)],
        &names,
    )?;
    root.present().map_err(|e| e.to_string())
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    lines: &[(&Vec<Series>, &str, bool)],
    names: &[String],
) -> Result<(), String> {
    let points = lines.iter().flat_map(|(s, _, _)| s.iter().flatten());
    let (x_max, y_max) = points.fold((1.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..(y_max * 1.15).max(1e-3))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .draw()
        .map_err(|e| e.to_string())?;
    for (series, suffix, dashed) in lines {
        for (i, points) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let style = ShapeStyle::from(&colour).stroke_width(2);
            let label = format!("{}{suffix}", names.get(i).map_or("", String::as_str));
            let drawn = if *dashed {
                chart.draw_series(DashedLineSeries::new(points.iter().copied(), 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(points.iter().copied(), style))
            };
            drawn
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())
}

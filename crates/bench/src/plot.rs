//! `--plot FILE.svg`: a latency percentile plot of a scenario's histograms, drawn with plotters'
//! SVG backend (without its default features, which need system fontconfig: text goes into the
//! SVG as `<text>` and the viewer renders it).
//!
//! The x axis counts nines — 0 %, 90 %, 99 %, 99.9 %, … at equal steps (x = −log10(1 − q)) — so
//! the tail gets as much room as the median; the y axis is the latency in milliseconds. Each
//! series' legend entry repeats its p50, p99, maximum and sample count.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

use crate::histogram::Histogram;

/// A report that has latency histograms to plot.
pub trait LatencyPlot {
    /// What the plot shows (its caption).
    fn plot_title(&self) -> String;
    /// The histograms, each with its legend name.
    fn plot_series(&self) -> Vec<(String, &Histogram)>;
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 560;
/// Most nines on the x axis (99.999 %).
const MAX_NINES: f64 = 5.0;
/// Points per nine on each curve.
const POINTS_PER_NINE: usize = 40;
const SERIES_COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Writes the plot of `report` to `path` as SVG.
pub fn write_svg(path: &Path, report: &dyn LatencyPlot) -> anyhow::Result<()> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg).with_context(|| format!("cannot write the plot to {}", path.display()))
}

/// The percentile label of x position `x`, e.g. `99.9%`.
fn percentile_label(x: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = (x.ceil() as usize).saturating_sub(2).min(6);
    format!("{percent:.decimals$}%")
}

/// The curve of one histogram: (nines, latency in ms), up to the nines its sample count supports.
fn curve(histogram: &Histogram, x_max: f64) -> Vec<(f64, f64)> {
    let steps = (x_max * POINTS_PER_NINE as f64).ceil() as usize;
    let mut points: Vec<(f64, f64)> = (0..=steps)
        .map(|step| {
            let x = x_max * step as f64 / steps.max(1) as f64;
            let q = 1.0 - 10f64.powf(-x);
            (x, histogram.quantile(q) as f64 / 1e6)
        })
        .collect();
    points.push((x_max, histogram.max() as f64 / 1e6));
    points
}

/// Renders the plot as an SVG document.
pub fn render_svg(report: &dyn LatencyPlot) -> anyhow::Result<String> {
    let series: Vec<(String, &Histogram)> = report
        .plot_series()
        .into_iter()
        .filter(|(_, histogram)| !histogram.is_empty())
        .collect();
    let samples = series.iter().map(|(_, h)| h.count()).max().unwrap_or(0);
    // Show the nines the data has (at least 99 %), at most 99.999 %.
    let x_max = (samples.max(100) as f64).log10().ceil().clamp(2.0, MAX_NINES);
    let y_max = series
        .iter()
        .map(|(_, h)| h.max() as f64 / 1e6)
        .fold(0.0, f64::max)
        .max(0.01)
        * 1.05;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(report.plot_title(), ("sans-serif", 20))
            .margin(16)
            .margin_right(48)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("percentile (each step one more nine)")
            .y_desc("latency (ms)")
            .x_labels(x_max as usize + 1)
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        for (position, (name, histogram)) in series.iter().enumerate() {
            let colour = SERIES_COLOURS[position % SERIES_COLOURS.len()];
            let p = histogram.percentiles();
            let label = format!(
                "{name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
                p.p50_ms, p.p99_ms, p.max_ms, p.samples
            );
            chart
                .draw_series(LineSeries::new(curve(histogram, x_max), colour.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        if series.is_empty() {
            root.draw(&Text::new(
                "no samples",
                (WIDTH as i32 / 2 - 40, HEIGHT as i32 / 2),
                ("sans-serif", 20),
            ))
            .map_err(|e| anyhow!("plot: {e}"))?;
        } else {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Example(Histogram);

    impl LatencyPlot for Example {
        fn plot_title(&self) -> String {
            "rtt: round-trip latency".to_string()
        }

        fn plot_series(&self) -> Vec<(String, &Histogram)> {
            vec![("round trip".to_string(), &self.0)]
        }
    }

    #[test]
    fn labels_count_nines() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
    }

    #[test]
    fn renders_an_svg_with_title_axes_and_legend() {
        let mut histogram = Histogram::new();
        for value in 1..=5000u64 {
            histogram.record(value * 1000);
        }
        let svg = render_svg(&Example(histogram)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.contains("rtt: round-trip latency"));
        assert!(svg.contains("latency (ms)"));
        assert!(svg.contains("99.9%"));
        assert!(svg.contains("round trip: p50"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        let empty = render_svg(&Example(Histogram::new())).unwrap();
        assert!(empty.contains("no samples"));
    }
}

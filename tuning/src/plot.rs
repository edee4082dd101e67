//! Plots, as SVG and PNG: a sweep's knob against goodput, CPU per GB and RTT under load (means
//! with 95% error bars), and a `--trace-out` CSV as a time series (columns found by their
//! header names). Text is drawn with DejaVu Sans (Debian's fonts-dejavu-core).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::sweep::{Measured, Slice};

const FONTS: [&str; 2] = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];

/// Registers the font plotters draws text with, once.
pub(crate) fn font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONTS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| format!("no font for plots at {} (Debian: apt-get install fonts-dejavu-core)", FONTS[0]))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "the plot font did not load".to_string())
    })
    .clone()
}

/// One panel: a label per x position, and a mean with a 95% interval at each.
struct Panel<'a> {
    title: &'a str,
    unit: &'a str,
    values: Vec<(f64, f64)>,
}

fn draw_panels<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, labels: &[String], panels: &[Panel<'_>]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("drawing {title}: {e}");
    area.fill(&WHITE).map_err(e)?;
    let area = area.titled(title, ("sans-serif", 22)).map_err(e)?;
    let n = labels.len().max(1);
    for (a, p) in area.split_evenly((1, panels.len())).iter().zip(panels) {
        let hi = p.values.iter().map(|&(m, ci)| m + if ci.is_finite() { ci } else { 0.0 }).fold(0.0f64, f64::max).max(1e-9) * 1.15;
        let mut chart = ChartBuilder::on(a)
            .caption(p.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 { labels.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
            })
            .y_desc(p.unit)
            .disable_x_mesh()
            .draw()
            .map_err(e)?;
        let color = Palette99::pick(0).to_rgba();
        chart.draw_series(LineSeries::new(p.values.iter().enumerate().map(|(i, &(m, _))| (i as f64, m)), color.stroke_width(2))).map_err(e)?;
        chart.draw_series(p.values.iter().enumerate().map(|(i, &(m, _))| Circle::new((i as f64, m), 4, color.filled()))).map_err(e)?;
        chart
            .draw_series(
                p.values.iter().enumerate().filter(|(_, (_, ci))| ci.is_finite()).map(|(i, &(m, ci))| ErrorBar::new_vertical(i as f64, (m - ci).max(0.0), m, m + ci, BLACK.stroke_width(1), 10)),
            )
            .map_err(e)?;
    }
    area.present().map_err(e)?;
    Ok(())
}

/// The plot of one knob: goodput, CPU per GB and RTT under load against its values.
pub fn knob(slice: &Slice, points: &[Measured], path: &Path) -> Result<(), String> {
    font()?;
    let found: Vec<(&String, &Measured)> = slice.points.iter().filter_map(|(v, key)| points.iter().find(|m| &m.point == key).map(|m| (v, m))).collect();
    if found.is_empty() {
        return Err(format!("no point of {} was measured", slice.knob.name()));
    }
    let labels: Vec<String> = found.iter().map(|(v, _)| (*v).clone()).collect();
    let panels = [
        Panel { title: "goodput", unit: "Gbit/s", values: found.iter().map(|(_, m)| (m.goodput.mean, m.goodput.ci95)).collect() },
        Panel { title: "CPU per GB", unit: "CPU s / GB", values: found.iter().map(|(_, m)| (m.cpu.mean, m.cpu.ci95)).collect() },
        Panel { title: "RTT under load", unit: "ms", values: found.iter().map(|(_, m)| (m.rtt.mean, m.rtt.ci95)).collect() },
    ];
    let title = format!("{} (mean and 95% interval per value)", slice.knob.name());
    let size = (1200, 420);
    let svg = path.with_extension("svg");
    draw_panels(&SVGBackend::new(&svg, size).into_drawing_area(), &title, &labels, &panels)?;
    let png = path.with_extension("png");
    draw_panels(&BitMapBackend::new(&png, size).into_drawing_area(), &title, &labels, &panels)?;
    Ok(())
}

/// A `--trace-out` CSV as a time series: goodput and PBA's prediction, smoothed RTT, and the
/// pacing rate, against time. Columns are found by their header names.
pub fn trace(csv_path: &Path, path: &Path) -> Result<(), String> {
    font()?;
    let mut rd = csv::Reader::from_path(csv_path).map_err(|e| format!("reading {}: {e}", csv_path.display()))?;
    let header = rd.headers().map_err(|e| format!("{}: {e}", csv_path.display()))?.clone();
    let col = |names: &[&str]| names.iter().find_map(|n| header.iter().position(|h| h == *n));
    let t = col(&["t_s"]).ok_or_else(|| format!("{}: no time column (t_s) in the header {:?}", csv_path.display(), header.iter().collect::<Vec<_>>()))?;
    // (panel, unit, [(column, legend, scale to the unit)]): what `TraceRow::HEADER` names.
    let wanted = [
        ("goodput and PBA's prediction", "Gbit/s", vec![("goodput_bps", "goodput", 1e-9), ("predicted_bps", "PBA predicted", 1e-9)]),
        ("RTT", "ms", vec![("srtt_us", "smoothed", 1e-3), ("min_rtt_us", "minimum", 1e-3)]),
        ("pacing rate (ACP)", "Gbit/s", vec![("pacing_bps", "pace", 1e-9)]),
        ("streams carrying data", "streams", vec![("active", "active", 1.0)]),
    ];
    let series: Vec<Series<'_>> = wanted
        .into_iter()
        .map(|(title, unit, cols)| (title, unit, cols.into_iter().filter_map(|(c, name, k)| Some((col(&[c])?, name, k))).collect::<Vec<_>>()))
        .filter(|s| !s.2.is_empty())
        .collect();
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for r in rd.records() {
        let r = r.map_err(|e| format!("{}: {e}", csv_path.display()))?;
        rows.push(r.iter().map(|v| v.parse::<f64>().unwrap_or(f64::NAN)).collect());
    }
    if rows.is_empty() {
        return Err(format!("{} has no rows", csv_path.display()));
    }
    // A line that never left zero (no pacing without ACP, no prediction yet) is left out.
    let series: Vec<Series<'_>> = series
        .into_iter()
        .map(|(title, unit, cols)| (title, unit, cols.into_iter().filter(|&(c, _, _)| rows.iter().any(|r| r.get(c).is_some_and(|v| v.is_finite() && *v != 0.0))).collect::<Vec<_>>()))
        .filter(|s| !s.2.is_empty())
        .collect();
    if series.is_empty() {
        return Err(format!("{}: none of goodput_bps, srtt_us, pacing_bps, active in the header has a value", csv_path.display()));
    }
    let size = (1100, 300 * series.len() as u32);
    let svg = path.with_extension("svg");
    draw_trace(&SVGBackend::new(&svg, size).into_drawing_area(), &rows, t, &series)?;
    let png = path.with_extension("png");
    draw_trace(&BitMapBackend::new(&png, size).into_drawing_area(), &rows, t, &series)?;
    Ok(())
}

/// A panel: title, unit, and (column, legend, scale) per line.
type Series<'a> = (&'a str, &'a str, Vec<(usize, &'a str, f64)>);

fn draw_trace<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, rows: &[Vec<f64>], t: usize, series: &[Series<'_>]) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("drawing the trace: {e}");
    area.fill(&WHITE).map_err(e)?;
    let t_max = rows.iter().map(|r| r[t]).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-3);
    for (a, (title, unit, cols)) in area.split_evenly((series.len(), 1)).iter().zip(series) {
        let hi = rows.iter().flat_map(|r| cols.iter().map(|&(c, _, k)| r.get(c).copied().unwrap_or(f64::NAN) * k)).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-9) * 1.1;
        let mut chart = ChartBuilder::on(a).caption(*title, ("sans-serif", 16)).margin(10).x_label_area_size(30).y_label_area_size(56).build_cartesian_2d(0f64..t_max, 0f64..hi).map_err(e)?;
        chart.configure_mesh().x_desc("s").y_desc(*unit).draw().map_err(e)?;
        for (i, &(c, name, k)) in cols.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(rows.iter().filter_map(|r| Some((r[t], *r.get(c)? * k))).filter(|(x, y)| x.is_finite() && y.is_finite()), color.stroke_width(2)))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw().map_err(e)?;
    }
    area.present().map_err(e)?;
    Ok(())
}

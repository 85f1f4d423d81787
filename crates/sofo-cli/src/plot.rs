//! Pictures: loss curves of several runs, against iterations and against
//! wall-clock seconds (PNG, with a font shipped in the binary so that no
//! system fonts are needed).

use plotters::coord::ranged1d::Ranged;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use sofo::train::MetricsRow;
use sofo::{Error, Result};
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("plot: {e}")))
}

/// Distinct line colours.
pub const COLOR_COUNT: usize = 6;

const COLORS: [RGBColor; COLOR_COUNT] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Named lines in the palette's colours, and their legend.
fn draw_lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: Vec<(String, Vec<(f64, f64)>)>,
    font: u32,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in lines.into_iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(plot_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font))
        .draw()
        .map_err(plot_err)
}

/// Writes `path`: two panels, loss (log scale) against iteration and
/// against seconds, one line per run. Non-finite losses are left out.
pub fn loss_curves(path: &Path, title: &str, runs: &[(String, Vec<MetricsRow>)]) -> Result<()> {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let pts = |r: &[MetricsRow], by_time: bool| -> Vec<(f64, f64)> {
        r.iter()
            .filter(|m| m.loss.is_finite() && m.loss > 0.0)
            .map(|m| {
                (
                    if by_time {
                        m.wall_s
                    } else {
                        (m.iteration + 1) as f64
                    },
                    m.loss,
                )
            })
            .collect()
    };
    let all: Vec<(f64, f64)> = runs.iter().flat_map(|(_, r)| pts(r, false)).collect();
    if all.is_empty() {
        return Err(Error::NonFinite("no finite loss to plot".into()));
    }
    let lo = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let (lo, hi) = (lo * 0.8, hi * 1.25);
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(plot_err)?;
    let panels = root.split_evenly((1, 2));
    let lines = |by_time: bool| -> Vec<(String, Vec<(f64, f64)>)> {
        runs.iter()
            .map(|(name, rows)| (name.clone(), pts(rows, by_time)))
            .collect()
    };
    let iters = runs
        .iter()
        .flat_map(|(_, r)| pts(r, false))
        .map(|p| p.0)
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&panels[0])
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..iters, (lo..hi).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("iteration")
        .y_desc("training loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    draw_lines(&mut chart, lines(false), 14)?;
    // optimisers' costs per iteration differ by orders of magnitude: log time
    let times: Vec<f64> = runs
        .iter()
        .flat_map(|(_, r)| pts(r, true))
        .map(|p| p.0)
        .filter(|t| *t > 0.0)
        .collect();
    let t_lo = times
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(1e-3)
        * 0.8;
    let t_hi = times
        .iter()
        .copied()
        .fold(0.0f64, f64::max)
        .max(t_lo * 10.0)
        * 1.25;
    let mut chart = ChartBuilder::on(&panels[1])
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((t_lo..t_hi).log_scale(), (lo..hi).log_scale())
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("wall-clock seconds (log)")
        .y_desc("training loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    draw_lines(&mut chart, lines(true), 14)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One panel of time series: a label, named lines over steps, and steps to
/// mark with a vertical line (e.g. switch times).
pub struct Trace {
    pub label: String,
    pub lines: Vec<(String, Vec<f64>)>,
    pub marks: Vec<usize>,
}

/// Writes `path`: one panel per trace, stacked, lines against time step.
pub fn traces(path: &Path, title: &str, panels: &[Trace]) -> Result<()> {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let h = 60 + 220 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (1200, h)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let root = root.titled(title, ("sans-serif", 20)).map_err(plot_err)?;
    for (area, p) in root
        .split_evenly((panels.len().max(1), 1))
        .iter()
        .zip(panels)
    {
        let n = p.lines.iter().map(|(_, v)| v.len()).max().unwrap_or(1);
        let (lo, hi) = p
            .lines
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .filter(|v| v.is_finite())
            .fold((-1.2f64, 1.2f64), |(a, b), v| (a.min(v), b.max(v)));
        let mut chart = ChartBuilder::on(area)
            .margin(10)
            .caption(&p.label, ("sans-serif", 16))
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n as f64, lo..hi)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(plot_err)?;
        for &m in &p.marks {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(m as f64, lo), (m as f64, hi)],
                    6,
                    4,
                    BLACK.mix(0.5).stroke_width(1),
                ))
                .map_err(plot_err)?;
        }
        let lines = p
            .lines
            .iter()
            .map(|(name, v)| {
                let pts = v.iter().enumerate().map(|(t, &y)| (t as f64, y)).collect();
                (name.clone(), pts)
            })
            .collect();
        draw_lines(&mut chart, lines, 13)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Writes `path`: points (x, y) with the diagonal y = x.
pub fn scatter(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    pts: &[(f64, f64)],
) -> Result<()> {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let finite: Vec<(f64, f64)> = pts
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(x, y)| {
            (a.min(x).min(y), b.max(x).max(y))
        });
    let (lo, hi) = if lo < hi {
        (lo - 0.05, hi + 0.05)
    } else {
        (-1.0, 1.0)
    };
    let root = BitMapBackend::new(path, (700, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(lo..hi, lo..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(LineSeries::new(vec![(lo, lo), (hi, hi)], BLACK.mix(0.4)))
        .map_err(plot_err)?;
    chart
        .draw_series(
            finite
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, COLORS[0].filled())),
        )
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One trial's hand path and its reach targets (m).
pub struct ReachPath {
    pub hand: Vec<(f64, f64)>,
    pub targets: Vec<(f64, f64)>,
}

/// Writes `path`: hand paths in the plane, each with its targets in the same
/// colour (the first a cross, the second a triangle), and the central spot as a black circle.
pub fn reach_paths(
    path: &Path,
    title: &str,
    centre: (f64, f64),
    paths: &[ReachPath],
) -> Result<()> {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let all = paths
        .iter()
        .flat_map(|p| p.hand.iter().chain(&p.targets))
        .chain(std::iter::once(&centre))
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (x0, x1, y0, y1) = all.fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    // equal scales on both axes, with a margin
    let half = 0.5 * (x1 - x0).max(y1 - y0).max(0.1) + 0.05;
    let (cx, cy) = (0.5 * (x0 + x1), 0.5 * (y0 + y1));
    let root = BitMapBackend::new(path, (760, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(cx - half..cx + half, cy - half..cy + half)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("hand x (m)")
        .y_desc("hand y (m)")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    for (i, p) in paths.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = p
            .hand
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(plot_err)?;
        // first target a cross, second a triangle
        for (k, &t) in p.targets.iter().enumerate() {
            if k == 0 {
                chart
                    .draw_series(std::iter::once(Cross::new(t, 8, c.stroke_width(3))))
                    .map_err(plot_err)?;
            } else {
                chart
                    .draw_series(std::iter::once(TriangleMarker::new(t, 9, c.filled())))
                    .map_err(plot_err)?;
            }
        }
    }
    chart
        .draw_series(std::iter::once(Circle::new(centre, 6, BLACK.filled())))
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

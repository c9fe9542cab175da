//! A small line chart as SVG, for the health page: time on x (the last
//! minutes, now at the right), one line per series.
use std::fmt::Write as _;

use crate::html::esc;

pub struct Series {
    /// CSS class of the line (its colour).
    pub class: &'static str,
    pub label: String,
    /// (seconds before now, value), any order.
    pub points: Vec<(f64, f64)>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 200.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 14.0;

/// A "nice" upper bound at or above `max` (1, 2 or 5 times a power of ten).
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * power)
}

/// The chart of `series` over the last `span_secs` seconds.
pub fn render(title: &str, unit: &str, span_secs: f64, series: &[Series]) -> String {
    let span = span_secs.max(1.0);
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|(_, v)| *v))
        .fold(0.0, f64::max);
    let top = nice(max);
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ago: f64| LEFT + plot_w * (1.0 - ago.min(span) / span);
    let y = |v: f64| TOP + plot_h * (1.0 - v / top);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{x2}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/><text class=\"axis\" x=\"{tx}\" y=\"{ty:.1}\">{label}</text>",
            x2 = WIDTH - 8.0,
            yy = y(v),
            tx = LEFT - 6.0,
            ty = y(v) + 4.0,
            label = if top < 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            },
        );
    }
    let minutes = (span / 60.0).round() as i64;
    for m in 0..=minutes {
        let ago = m as f64 * 60.0;
        let label = if m == 0 {
            "now".to_owned()
        } else {
            format!("-{m} min")
        };
        let _ = write!(
            svg,
            "<text class=\"axis axis-x\" x=\"{:.1}\" y=\"{}\">{label}</text>",
            x(ago),
            HEIGHT - 6.0
        );
    }
    let _ = write!(
        svg,
        "<text class=\"axis unit\" x=\"{LEFT}\" y=\"10\">{}</text>",
        esc(unit)
    );
    for (i, s) in series.iter().enumerate() {
        let mut points = s.points.clone();
        points.sort_by(|a, b| b.0.total_cmp(&a.0));
        let path: Vec<String> = points
            .iter()
            .map(|(ago, v)| format!("{:.1},{:.1}", x(*ago), y(*v)))
            .collect();
        if path.len() > 1 {
            let _ = write!(
                svg,
                "<polyline class=\"line {}\" points=\"{}\"/>",
                s.class,
                path.join(" ")
            );
        }
        let _ = write!(
            svg,
            "<g class=\"legend {}\"><rect x=\"{lx}\" y=\"4\" width=\"10\" height=\"10\"/><text x=\"{tx}\" y=\"13\">{}</text></g>",
            s.class,
            esc(&s.label),
            lx = LEFT + 90.0 + i as f64 * 140.0,
            tx = LEFT + 104.0 + i as f64 * 140.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

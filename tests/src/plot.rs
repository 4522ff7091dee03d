//! Line charts as SVG for the benchmarks' reports: panels side by side, a
//! logarithmic x axis (the number of Services), a linear y axis from zero,
//! one line per series with a shared legend. Plain text, no dependencies.

use std::fmt::Write as _;

/// One line: its name and its (x, y) points; x must be positive.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 460.0;
const HEIGHT: f64 = 300.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_BOTTOM: f64 = 50.0;
const LEGEND_ROW: f64 = 20.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// The panels side by side, `x_label` under each, the legend (the series
/// names of the first panel) below them all.
pub fn svg(panels: &[Panel], x_label: &str) -> String {
    let names: Vec<&str> = panels
        .first()
        .map(|p| p.series.iter().map(|s| s.name.as_str()).collect())
        .unwrap_or_default();
    let total_w = WIDTH * panels.len().max(1) as f64;
    let total_h = HEIGHT + LEGEND_ROW * (names.len() as f64 + 1.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{total_w}\" height=\"{total_h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, panel) in panels.iter().enumerate() {
        let _ = writeln!(out, "<g transform=\"translate({},0)\">", WIDTH * i as f64);
        draw_panel(&mut out, panel, x_label);
        out.push_str("</g>\n");
    }
    for (i, name) in names.iter().enumerate() {
        let y = HEIGHT + LEGEND_ROW * (i as f64 + 0.5);
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            out,
            "<line x1=\"{MARGIN_LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            MARGIN_LEFT + 24.0,
            MARGIN_LEFT + 30.0,
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Where data coordinates land in a panel.
struct Scale {
    x_min: f64,
    x_max: f64,
    y_max: f64,
}

impl Scale {
    fn of(panel: &Panel) -> Scale {
        let points = panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x_min, mut x_max, mut y_max) = (f64::MAX, f64::MIN, 0.0f64);
        for &(x, y) in points {
            x_min = x_min.min(x.log10());
            x_max = x_max.max(x.log10());
            y_max = y_max.max(y);
        }
        if x_min > x_max {
            (x_min, x_max) = (0.0, 1.0);
        }
        if x_max - x_min < 1e-9 {
            x_max = x_min + 1.0;
        }
        Scale {
            x_min,
            x_max,
            y_max: nice_ceiling(y_max * 1.05),
        }
    }

    fn x(&self, x: f64) -> f64 {
        let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
        MARGIN_LEFT + (x.log10() - self.x_min) / (self.x_max - self.x_min) * plot_w
    }

    fn y(&self, y: f64) -> f64 {
        let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
        HEIGHT - MARGIN_BOTTOM - y / self.y_max * plot_h
    }
}

fn draw_panel(out: &mut String, panel: &Panel, x_label: &str) {
    let scale = Scale::of(panel);
    let (left, right) = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT);
    let (top, bottom) = (MARGIN_TOP, HEIGHT - MARGIN_BOTTOM);
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\n\
         <line x1=\"{left}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"14\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {})\">{}</text>",
        WIDTH / 2.0,
        escape(&panel.title),
        (left + right) / 2.0,
        HEIGHT - 12.0,
        escape(x_label),
        (top + bottom) / 2.0,
        (top + bottom) / 2.0,
        escape(&panel.y_label),
    );
    for step in 0..=4 {
        let value = scale.y_max * f64::from(step) / 4.0;
        let y = scale.y(value);
        let _ = writeln!(
            out,
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{right}\" y2=\"{y}\" stroke=\"#ddd\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + 4.0,
            short(value)
        );
    }
    let mut xs: Vec<f64> = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            scale.x(x),
            bottom + 16.0,
            short(x)
        );
    }
    for (i, series) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = series
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", scale.x(x), scale.y(y)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        for p in &points {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                out,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{colour}\"/>"
            );
        }
    }
}

/// The smallest of 1, 2, 2.5 or 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * power)
}

/// 12, 1.5k, 10k, 2.5M.
fn short(v: f64) -> String {
    let (value, unit) = if v.abs() >= 1e6 {
        (v / 1e6, "M")
    } else if v.abs() >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let text = format!("{value:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{unit}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel() -> Panel {
        Panel {
            title: "conn/s".into(),
            y_label: "connections per second".into(),
            series: vec![
                Series {
                    name: "no proxy".into(),
                    points: vec![(10.0, 8000.0), (1000.0, 8100.0), (10000.0, 7900.0)],
                },
                Series {
                    name: "iptables <legacy>".into(),
                    points: vec![(10.0, 7000.0), (1000.0, 6000.0), (10000.0, 5000.0)],
                },
            ],
        }
    }

    #[test]
    fn draws_one_line_per_series_and_a_legend() {
        let out = svg(&[panel(), panel()], "Services");
        assert!(out.starts_with("<svg "), "{out}");
        assert!(out.ends_with("</svg>\n"));
        assert_eq!(out.matches("<polyline").count(), 4);
        assert_eq!(out.matches("<circle").count(), 12);
        // Names are escaped, and the legend names each series once.
        assert_eq!(out.matches("iptables &lt;legacy&gt;").count(), 1);
        assert!(!out.contains("<legacy>"));
    }

    #[test]
    fn x_is_logarithmic_and_y_starts_at_zero() {
        let p = panel();
        let scale = Scale::of(&p);
        let (a, b, c) = (scale.x(10.0), scale.x(1000.0), scale.x(10000.0));
        assert!((b - a - 2.0 * (c - b)).abs() < 1e-6, "{a} {b} {c}");
        assert_eq!(scale.y(0.0), HEIGHT - MARGIN_BOTTOM);
        assert_eq!(scale.y_max, 10_000.0);
    }

    #[test]
    fn axis_numbers_are_short_and_round() {
        assert_eq!(nice_ceiling(8400.0), 10_000.0);
        assert_eq!(nice_ceiling(210.0), 250.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(short(10_000.0), "10k");
        assert_eq!(short(1_500.0), "1.5k");
        assert_eq!(short(35.0), "35");
    }
}

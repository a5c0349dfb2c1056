//! Line charts as SVG text for `weir plan` (replicas, cost and latency over time).
//!
//! Hand-written on purpose: a chart here is a frame, a few ticks and one polyline per policy, about a hundred lines;
//! plotting crates (plotters and its font/bitmap stack) would add far more build time on a 2-core CI than this saves.

use std::fmt::Write;

/// One named line of (x, y) points.
pub struct Line<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step for a span (1, 2 or 5 times a power of ten).
fn step(span: f64, ticks: f64) -> f64 {
    let raw = (span / ticks).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let k = if n <= 1.0 {
        1.0
    } else if n <= 2.0 {
        2.0
    } else if n <= 5.0 {
        5.0
    } else {
        10.0
    };
    k * mag
}

/// A chart of `lines` (non-finite points skipped) with axis labels.
pub fn chart(title: &str, x_label: &str, y_label: &str, lines: &[Line<'_>]) -> String {
    let (w, h) = (900.0, 360.0);
    let (l, r, t, b) = (70.0, 160.0, 36.0, 44.0);
    let pts = || {
        lines
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let x_max = pts().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
    let y_max = pts().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let px = |x: f64| l + x / x_max * (w - l - r);
    let py = |y: f64| h - b - y / y_max * (h - t - b);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" font-size="14" font-weight="bold">{}</text>
<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>
"#,
        l,
        esc(title),
        h - b,
        w - r,
        h - b,
        h - b,
        (l + w - r) / 2.0,
        h - 8.0,
        esc(x_label),
        (t + h - b) / 2.0,
        (t + h - b) / 2.0,
        esc(y_label)
    );
    let xs = step(x_max, 8.0);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            px(x),
            t,
            h - b,
            h - b + 16.0,
            x
        );
        x += xs;
    }
    let ys = step(y_max, 5.0);
    let mut y = 0.0;
    while y <= y_max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            l,
            py(y),
            w - r,
            l - 6.0,
            py(y) + 4.0,
            y
        );
        y += ys;
    }
    for (k, line) in lines.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let mut d = String::new();
        for &(x, y) in line
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
        {
            let _ = write!(d, "{:.1},{:.1} ", px(x), py(y));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.2" points="{}"/>"#,
            d.trim_end()
        );
        let ly = t + 16.0 * k as f64 + 8.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0,
            esc(line.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_polyline_per_line_with_a_legend_and_escapes_text() {
        let svg = chart(
            "replicas <all>",
            "hour",
            "pods",
            &[
                Line {
                    name: "weir",
                    points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, f64::NAN)],
                },
                Line {
                    name: "hpa",
                    points: vec![(0.0, 2.0), (2.0, 2.0)],
                },
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">weir</text>") && svg.contains(">hpa</text>"));
        assert!(svg.contains("replicas &lt;all&gt;"));
        assert!(!svg.contains("NaN"));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(step(24.0, 8.0), 5.0);
        assert_eq!(step(7.0, 5.0), 2.0);
        assert_eq!(step(0.9, 5.0), 0.2);
    }
}

//! Pictures of a run as plain SVG (no plotting dependency; any browser or image viewer shows them): the loss
//! and accuracy curves, and a confusion matrix.

use std::fmt::Write;

/// A named series of `(x, y)` points and its colour.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One chart panel.
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
}

const W: f64 = 560.0;
const H: f64 = 300.0;
const M: (f64, f64, f64, f64) = (60.0, 20.0, 40.0, 44.0); // left, right, top, bottom

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step near `range / 5`.
fn tick_step(range: f64) -> f64 {
    let raw = (range / 5.0).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn panel(svg: &mut String, p: &Panel<'_>, x_label: &str, top: f64) {
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let (mut y0, mut y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
        (a.min(*y), b.max(*y))
    });
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        (y0, y1) = (y0 - 0.5, y1 + 0.5);
    }
    let pad = (y1 - y0) * 0.08;
    (y0, y1) = (y0 - pad, y1 + pad);
    let (l, r, t, b) = M;
    let (pw, ph) = (W - l - r, H - t - b);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + t + ph - (y - y0) / (y1 - y0) * ph;
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"##,
        l,
        top + 24.0,
        esc(p.title)
    );
    let _ = write!(
        svg,
        r##"<rect x="{l}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
        top + t
    );
    let step = tick_step(y1 - y0);
    let mut y = (y0 / step).ceil() * step;
    while y <= y1 {
        let (x2, yy, lx, ly, label) = (l + pw, sy(y), l - 6.0, sy(y) + 4.0, trim(y));
        let _ = write!(
            svg,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{lx}" y="{ly:.1}" font-size="11" text-anchor="end">{label}</text>"##
        );
        y += step;
    }
    let step = tick_step(x1 - x0).max(if x1 - x0 >= 5.0 { 1.0 } else { 0.0 });
    let mut x = (x0 / step).ceil() * step;
    while x <= x1 {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"##,
            sx(x),
            top + t + ph + 16.0,
            trim(x)
        );
        x += step;
    }
    let _ = write!(
        svg,
        r##"<text x="{:.1}" y="{}" font-size="12" text-anchor="middle">{}</text><text x="14" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {:.1})">{}</text>"##,
        l + pw / 2.0,
        top + H - 8.0,
        esc(x_label),
        top + t + ph / 2.0,
        top + t + ph / 2.0,
        esc(p.y_label)
    );
    for (k, s) in p.series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        if path.len() > 1 {
            let _ = write!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"##,
                path.join(" "),
                s.color
            );
        }
        for p in &path {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(
                svg,
                r##"<circle cx="{cx}" cy="{cy}" r="2.5" fill="{}"/>"##,
                s.color
            );
        }
        let ly = top + t + 14.0 + 16.0 * k as f64;
        let _ = write!(
            svg,
            r##"<rect x="{}" y="{}" width="12" height="3" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"##,
            l + pw - 150.0,
            ly - 4.0,
            s.color,
            l + pw - 134.0,
            ly,
            esc(s.name)
        );
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// Panels stacked vertically, sharing the x axis label.
pub fn line_chart(panels: &[Panel<'_>], x_label: &str) -> String {
    let height = H * panels.len() as f64;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"##
    );
    for (i, p) in panels.iter().enumerate() {
        panel(&mut svg, p, x_label, H * i as f64);
    }
    svg.push_str("</svg>\n");
    svg
}

/// A 2×2 (or n×n) confusion matrix, rows the truth and columns the prediction, shaded by row share.
pub fn confusion_matrix(title: &str, labels: &[&str], counts: &[Vec<usize>]) -> String {
    let n = labels.len();
    let cell = 90.0;
    let (l, t) = (110.0, 70.0);
    let (w, h) = (l + cell * n as f64 + 20.0, t + cell * n as f64 + 40.0);
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="14" font-weight="bold">{}</text><text x="{}" y="52" font-size="12" text-anchor="middle">predicted</text>"##,
        esc(title),
        l + cell * n as f64 / 2.0
    );
    for (i, row) in counts.iter().enumerate().take(n) {
        let total: usize = row.iter().sum();
        for (j, &c) in row.iter().enumerate().take(n) {
            let share = if total > 0 {
                c as f64 / total as f64
            } else {
                0.0
            };
            let shade = (255.0 - share * 180.0) as u8;
            let (x, y) = (l + cell * j as f64, t + cell * i as f64);
            let _ = write!(
                svg,
                r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb({shade},{shade},255)" stroke="#666"/><text x="{}" y="{}" font-size="16" text-anchor="middle">{c}</text><text x="{}" y="{}" font-size="11" text-anchor="middle">{:.0}%</text>"##,
                x + cell / 2.0,
                y + cell / 2.0,
                x + cell / 2.0,
                y + cell / 2.0 + 16.0,
                share * 100.0
            );
        }
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="end">true {}</text>"##,
            l - 8.0,
            t + cell * i as f64 + cell / 2.0 + 4.0,
            esc(labels[i])
        );
    }
    for (j, label) in labels.iter().enumerate() {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"##,
            l + cell * j as f64 + cell / 2.0,
            t - 6.0,
            esc(label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let svg = line_chart(
            &[Panel {
                title: "loss",
                y_label: "loss",
                series: vec![
                    Series {
                        name: "train <smoothed>",
                        color: "#1f77b4",
                        points: vec![(1.0, 0.7), (2.0, 0.6), (3.0, f64::NAN)],
                    },
                    Series {
                        name: "val",
                        color: "#d62728",
                        points: vec![(2.0, 0.65)],
                    },
                ],
            }],
            "step",
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("train &lt;smoothed&gt;") && svg.contains("<polyline"));
        assert!(!svg.contains("NaN"));
        let cm = confusion_matrix("val", &["A", "B"], &[vec![3, 1], vec![0, 4]]);
        assert!(cm.contains(">75%<") && cm.contains(">100%<"));
    }
}

//! Inline SVG charts for the HTML report: line charts and interval bars. Hand-written because a
//! report needs two chart shapes, and SVG text needs no font files (plotters' text rendering does).

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 300.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;
pub const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// About five round tick values covering lo..hi.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(mag * 10.0);
    // Whole multiples of the step, rounded at the step's decimals so 3 x 0.2 prints as 0.6.
    let scale = 10f64.powi((-step.log10().floor()).max(0.0) as i32 + 1);
    let mut out = Vec::new();
    let mut k = (lo / step).ceil();
    while k * step <= hi + step * 1e-9 {
        out.push((k * step * scale).round() / scale + 0.0);
        k += 1.0;
    }
    out
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The plotting area of a chart: the data's bounds and the scales from them to the picture.
struct Frame {
    x: (f64, f64),
    y: (f64, f64),
    pw: f64,
    ph: f64,
}

impl Frame {
    /// The bounds of every point (padded, or `y_range` for y); None without points.
    fn of(series: &[(String, Vec<(f64, f64)>)], y_range: Option<(f64, f64)>) -> Option<Frame> {
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in series.iter().flat_map(|s| s.1.iter()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            return None;
        }
        if let Some((a, b)) = y_range {
            (y0, y1) = (a, b);
        } else {
            let pad = ((y1 - y0) * 0.05).max(1e-6);
            (y0, y1) = (y0 - pad, y1 + pad);
        }
        if x1 - x0 < 1e-12 {
            (x0, x1) = (x0 - 1.0, x1 + 1.0);
        }
        Some(Frame { x: (x0, x1), y: (y0, y1), pw: W - LEFT - RIGHT, ph: H - TOP - BOTTOM })
    }

    fn sx(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * self.pw
    }

    fn sy(&self, y: f64) -> f64 {
        TOP + self.ph - (y - self.y.0) / (self.y.1 - self.y.0) * self.ph
    }
}

/// A line chart of named series of (x, y) points. `x_ticks` labels chosen x positions (e.g. the
/// k of Recall@k); without them round values are used. `y_range` fixes the y axis.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    x_ticks: Option<&[(f64, String)]>,
    y_range: Option<(f64, f64)>,
) -> String {
    let Some(f) = Frame::of(series, y_range) else {
        return format!("<p class=\"empty\">{}: no data</p>", escape(title));
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\">\
         <title>{t}</title><text x=\"{LEFT}\" y=\"18\" class=\"title\">{t}</text>",
        t = escape(title)
    );
    axes(&mut s, &f, x_ticks, (x_label, y_label));
    lines(&mut s, &f, series);
    s.push_str("</svg>");
    s
}

/// Grid lines and labels of both axes, the frame and the axis titles.
fn axes(s: &mut String, f: &Frame, x_ticks: Option<&[(f64, String)]>, (x_label, y_label): (&str, &str)) {
    let (pw, ph) = (f.pw, f.ph);
    for t in ticks(f.y.0, f.y.1) {
        let y = f.sy(t);
        let _ = write!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"grid\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            label(t)
        );
    }
    let xt: Vec<(f64, String)> = match x_ticks {
        Some(t) => t.to_vec(),
        None => ticks(f.x.0, f.x.1).into_iter().map(|t| (t, label(t))).collect(),
    };
    for (t, l) in xt {
        let x = f.sx(t);
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"axis\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + ph,
            TOP + ph + 4.0,
            TOP + ph + 16.0,
            escape(&l)
        );
    }
    let _ = write!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" class=\"frame\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        LEFT + pw / 2.0,
        H - 8.0,
        escape(x_label),
        TOP + ph / 2.0,
        escape(y_label)
    );
}

/// Each series as a line (with its points when there are few) and its entry in the legend.
fn lines(s: &mut String, f: &Frame, series: &[(String, Vec<(f64, f64)>)]) {
    for (i, (name, points)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", f.sx(x), f.sy(y))).collect();
        let _ = write!(s, "<polyline points=\"{}\" fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"/>", path.join(" "));
        if points.len() <= 40 {
            for &(x, y) in points {
                let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"/>", f.sx(x), f.sy(y));
            }
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let _ = write!(
            s,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            LEFT + f.pw + 12.0,
            LEFT + f.pw + 30.0,
            LEFT + f.pw + 36.0,
            ly + 4.0,
            escape(name)
        );
    }
}

/// Horizontal bars of proportions with their intervals: (name, value, low, high), all in 0..1.
pub fn interval_bars(title: &str, rows: &[(String, f64, f64, f64)]) -> String {
    let row_h = 26.0;
    let h = TOP + rows.len() as f64 * row_h + BOTTOM;
    let (left, pw) = (130.0, W - 130.0 - 80.0);
    let sx = |v: f64| left + v.clamp(0.0, 1.0) * pw;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\">\
         <title>{t}</title><text x=\"{left}\" y=\"18\" class=\"title\">{t}</text>",
        t = escape(title)
    );
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let x = sx(t);
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" class=\"grid\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            h - BOTTOM,
            h - BOTTOM + 16.0,
            label(t)
        );
    }
    for (i, (name, v, lo, hi)) in rows.iter().enumerate() {
        let y = TOP + i as f64 * row_h;
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{left}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{c}\" opacity=\"0.8\"/>\
             <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"whisker\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{:.3}</text>",
            left - 8.0,
            y + row_h * 0.6,
            escape(name),
            y + 4.0,
            sx(*v) - left,
            row_h - 8.0,
            sx(*lo),
            sx(*hi),
            y + row_h / 2.0,
            y + row_h / 2.0,
            sx(1.0) + 8.0,
            y + row_h * 0.6,
            v
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0), [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);
        assert_eq!(ticks(3.0, 48.0), [10.0, 20.0, 30.0, 40.0]);
    }

    #[test]
    fn charts_place_points_and_escape_names() {
        let svg =
            line_chart("R@k", "k", "recall", &[("a<b".into(), vec![(0.0, 0.0), (1.0, 1.0)])], None, Some((0.0, 1.0)));
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        // (0, 0) is the bottom-left corner of the plot area, (1, 1) the top-right.
        assert!(svg.contains(&format!("points=\"{LEFT:.1},{:.1} {:.1},{TOP:.1}\"", H - BOTTOM, W - RIGHT)), "{svg}");
        assert!(line_chart("x", "", "", &[], None, None).contains("no data"));
        let bars = interval_bars("acc", &[("mafin".into(), 0.5, 0.3, 0.7)]);
        assert!(bars.contains(">0.500<"));
    }
}

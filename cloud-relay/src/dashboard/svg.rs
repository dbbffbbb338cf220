//! Server-rendered SVG plots: time series (lines, with vertical markers and horizontal
//! reference lines), stacked bars over time, sparklines. Pure: data in, SVG text out, every
//! text through [`esc`]. No script, no style attributes (the page's CSS styles the classes), so
//! the page's Content-Security-Policy can forbid both.
//!
//! Every plot is an `<svg class="plot">` carrying `data-points` (how many data points it
//! draws), every series a `<polyline class="series" data-name=...>` or bars `<rect
//! class="bar">`: what the browser test looks for.

use std::fmt::Write as _;

/// Escapes text for HTML and XML, in content and in quoted attributes alike.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not valid XML 1.0; nothing from the wire needs them.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// A linear map from a data interval onto a pixel interval. A degenerate data interval (one
/// value, or none) is widened around its value so one point lands in the middle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    pub d0: f64,
    pub d1: f64,
    r0: f64,
    r1: f64,
}

impl Scale {
    pub fn new(d0: f64, d1: f64, r0: f64, r1: f64) -> Scale {
        let (mut d0, mut d1) = if d0.is_finite() && d1.is_finite() {
            (d0.min(d1), d0.max(d1))
        } else {
            (0.0, 1.0)
        };
        if d1 - d0 <= f64::EPSILON * d0.abs().max(1.0) {
            let pad = if d0 == 0.0 { 1.0 } else { d0.abs() * 0.1 };
            d0 -= pad;
            d1 += pad;
        }
        Scale { d0, d1, r0, r1 }
    }

    pub fn map(&self, v: f64) -> f64 {
        self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)
    }
}

/// About `n` round tick values (steps of 1, 2 or 5 × 10^k) within `[lo, hi]`.
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo || n == 0 {
        return Vec::new();
    }
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil();
    let mut out = Vec::new();
    for i in 0..4 * n + 2 {
        let v = (first + i as f64) * step;
        if v > hi + step * 1e-9 {
            break;
        }
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
    }
    out
}

/// A tick value as people read it: no trailing zeros, at most 3 decimals.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let s = format!("{:.3}", v);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// `HH:MM` (UTC) of a Unix time in ms; with seconds when `seconds`.
pub fn clock(t_ms: f64, seconds: bool) -> String {
    let s = (t_ms / 1000.0).floor().max(0.0) as u64 % 86_400;
    if seconds {
        format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 3600, s / 60 % 60)
    }
}

/// One line of a chart: `(x, y)` points, x in Unix ms.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// A CSS class giving its colour (`c0` … `c5`, defined in the page's CSS).
    pub class: &'static str,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Drawn as steps (a value holds until the next one), e.g. a threshold.
    pub step: bool,
}

impl Series {
    pub fn new(name: &str, class: &'static str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.to_string(),
            class,
            points: points
                .into_iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect(),
            dashed: false,
            step: false,
        }
    }

    pub fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }

    pub fn step(mut self) -> Series {
        self.step = true;
        self
    }
}

/// A vertical line at `x` (an event: the tuner's push), labelled on hover.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// A horizontal reference line (a target).
#[derive(Debug, Clone, PartialEq)]
pub struct HLine {
    pub y: f64,
    pub label: String,
}

/// A time-series chart.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    /// The y axis' unit, shown by the title (`%`, `ms`, `J`).
    pub unit: String,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
    pub hlines: Vec<HLine>,
    /// Fixed y bounds (else from the data, with 0 included when `from_zero`).
    pub y_min: Option<f64>,
    pub y_max: Option<f64>,
    pub from_zero: bool,
    /// Fixed x span (else from the data).
    pub x_range: Option<(f64, f64)>,
    /// Multiplies y for the tick labels (100 for a ratio shown in %).
    pub y_label_scale: f64,
}

pub const WIDTH: f64 = 640.0;
pub const HEIGHT: f64 = 210.0;
const LEFT: f64 = 50.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 26.0;

fn open_svg(out: &mut String, title: &str, points: usize) {
    let _ = write!(
        out,
        "<svg class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         role=\"img\" aria-label=\"{t}\" data-points=\"{points}\"><title>{t}</title>\
         <text class=\"title\" x=\"{LEFT}\" y=\"16\">{t}</text>",
        t = esc(title)
    );
}

fn frame(out: &mut String) {
    let _ = write!(
        out,
        "<rect class=\"frame\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\"/>",
        WIDTH - LEFT - RIGHT,
        HEIGHT - TOP - BOTTOM
    );
}

fn no_data(out: &mut String) {
    let _ = write!(
        out,
        "<text class=\"empty\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data yet</text></svg>",
        (LEFT + WIDTH - RIGHT) / 2.0,
        (TOP + HEIGHT - BOTTOM) / 2.0
    );
}

/// Legend entries along the top, right of the title's line.
fn legend(out: &mut String, entries: &[(&str, &str, bool)]) {
    let mut x = LEFT;
    for (name, class, dashed) in entries {
        let dash = if *dashed { " dashed" } else { "" };
        let _ = write!(
            out,
            "<g class=\"legend\"><line class=\"swatch {class}{dash}\" x1=\"{x}\" y1=\"29\" x2=\"{}\" y2=\"29\"/>\
             <text x=\"{}\" y=\"33\">{}</text></g>",
            x + 14.0,
            x + 18.0,
            esc(name)
        );
        x += 26.0 + 6.5 * name.chars().count() as f64;
    }
}

fn axes(out: &mut String, xs: &Scale, ys: &Scale, y_label_scale: f64) {
    for v in ticks(ys.d0, ys.d1, 4) {
        let y = ys.map(v);
        let _ = write!(
            out,
            "<line class=\"grid\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"/>\
             <text class=\"tick\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 4.0,
            y + 3.5,
            num(v * y_label_scale)
        );
    }
    let span = xs.d1 - xs.d0;
    let seconds = span < 10.0 * 60_000.0;
    let step_ms = ticks(xs.d0, xs.d1, 5);
    for v in step_ms {
        let x = xs.map(v);
        let _ = write!(
            out,
            "<text class=\"tick\" x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            HEIGHT - BOTTOM + 15.0,
            clock(v, seconds)
        );
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// A time-series chart with its series, markers and reference lines; "no data yet" when no
/// series has a point.
pub fn line_chart(c: &Chart) -> String {
    let total: usize = c.series.iter().map(|s| s.points.len()).sum();
    let mut out = String::new();
    open_svg(&mut out, &format_title(&c.title, &c.unit), total);
    frame(&mut out);
    if total == 0 {
        no_data(&mut out);
        return out;
    }
    let all = || c.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = c
        .x_range
        .or_else(|| bounds(all().map(|p| p.0)))
        .unwrap_or((0.0, 1.0));
    let (mut y0, mut y1) =
        bounds(all().map(|p| p.1).chain(c.hlines.iter().map(|h| h.y))).unwrap_or((0.0, 1.0));
    if c.from_zero {
        y0 = y0.min(0.0);
        y1 = y1.max(0.0);
    }
    let y0 = c.y_min.unwrap_or(y0);
    let y1 = c.y_max.unwrap_or(y1);
    let xs = Scale::new(x0, x1, LEFT, WIDTH - RIGHT);
    let ys = Scale::new(y0, y1, HEIGHT - BOTTOM, TOP);
    let ys = if c.y_max.is_none() {
        // A little headroom above the highest value.
        let pad = (ys.d1 - ys.d0) * 0.06;
        Scale::new(ys.d0, ys.d1 + pad, HEIGHT - BOTTOM, TOP)
    } else {
        ys
    };
    let label_scale = if c.y_label_scale == 0.0 {
        1.0
    } else {
        c.y_label_scale
    };
    axes(&mut out, &xs, &ys, label_scale);
    let clamp_x = |v: f64| xs.map(v).clamp(LEFT, WIDTH - RIGHT);
    let clamp_y = |v: f64| ys.map(v).clamp(TOP, HEIGHT - BOTTOM);
    for h in &c.hlines {
        let y = clamp_y(h.y);
        let _ = write!(
            out,
            "<line class=\"hline\" x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\"><title>{}</title></line>\
             <text class=\"hlabel\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - RIGHT,
            esc(&h.label),
            WIDTH - RIGHT - 3.0,
            y - 3.0,
            esc(&h.label)
        );
    }
    for m in c.markers.iter().filter(|m| m.x.is_finite()) {
        let x = clamp_x(m.x);
        let _ = write!(
            out,
            "<line class=\"marker\" x1=\"{x:.1}\" y1=\"{TOP}\" x2=\"{x:.1}\" y2=\"{}\"><title>{}</title></line>\
             <path class=\"marker-head\" d=\"M{:.1} {TOP}l4 -6h-8z\"><title>{}</title></path>",
            HEIGHT - BOTTOM,
            esc(&m.label),
            x,
            esc(&m.label)
        );
    }
    for s in &c.series {
        if s.points.is_empty() {
            continue;
        }
        let mut pts = String::new();
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &s.points {
            let (px, py) = (clamp_x(x), clamp_y(y));
            if let (true, Some((_, last_y))) = (s.step, prev) {
                let _ = write!(pts, "{px:.1},{last_y:.1} ");
            }
            let _ = write!(pts, "{px:.1},{py:.1} ");
            prev = Some((px, py));
        }
        let dash = if s.dashed { " dashed" } else { "" };
        let _ = write!(
            out,
            "<polyline class=\"series {}{dash}\" data-name=\"{}\" data-points=\"{}\" points=\"{}\"/>",
            s.class,
            esc(&s.name),
            s.points.len(),
            pts.trim_end()
        );
        // A lone point has no line to show it: a dot.
        if let [(x, y)] = s.points[..] {
            let _ = write!(
                out,
                "<circle class=\"dot {}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"/>",
                s.class,
                clamp_x(x),
                clamp_y(y)
            );
        }
    }
    let entries: Vec<(&str, &str, bool)> = c
        .series
        .iter()
        .map(|s| (s.name.as_str(), s.class, s.dashed))
        .collect();
    legend(&mut out, &entries);
    out.push_str("</svg>");
    out
}

fn format_title(title: &str, unit: &str) -> String {
    if unit.is_empty() {
        title.to_string()
    } else {
        format!("{title} ({unit})")
    }
}

/// Bars over time, each stacked from its categories' values.
#[derive(Debug, Clone, Default)]
pub struct Stacked {
    pub title: String,
    pub unit: String,
    /// Name and colour class of each category, bottom first.
    pub categories: Vec<(String, &'static str)>,
    /// `(start, end)` of each bar's time span (Unix ms) and its values by category.
    pub bars: Vec<((f64, f64), Vec<f64>)>,
    pub x_range: Option<(f64, f64)>,
}

/// A stacked bar chart; "no data yet" without bars (or only empty ones).
pub fn stacked_bars(c: &Stacked) -> String {
    let bars: Vec<&((f64, f64), Vec<f64>)> = c
        .bars
        .iter()
        .filter(|((a, b), v)| {
            a.is_finite() && b.is_finite() && v.iter().any(|x| x.is_finite() && *x > 0.0)
        })
        .collect();
    let mut out = String::new();
    open_svg(&mut out, &format_title(&c.title, &c.unit), bars.len());
    frame(&mut out);
    if bars.is_empty() {
        no_data(&mut out);
        return out;
    }
    let height = |v: &[f64]| -> f64 { v.iter().filter(|x| x.is_finite() && **x > 0.0).sum() };
    let y1 = bars.iter().map(|(_, v)| height(v)).fold(0.0, f64::max);
    let (x0, x1) = c
        .x_range
        .or_else(|| bounds(bars.iter().flat_map(|((a, b), _)| [*a, *b])))
        .unwrap_or((0.0, 1.0));
    let xs = Scale::new(x0, x1, LEFT, WIDTH - RIGHT);
    let ys = Scale::new(0.0, y1 * 1.06, HEIGHT - BOTTOM, TOP);
    axes(&mut out, &xs, &ys, 1.0);
    for ((a, b), values) in bars {
        let left = xs.map(*a).clamp(LEFT, WIDTH - RIGHT);
        let right = xs.map(*b).clamp(LEFT, WIDTH - RIGHT);
        // At least a pixel wide, with a gap between neighbours when there is room.
        let w = (right - left).max(1.0);
        let (left, w) = if w > 4.0 {
            (left + 0.5, w - 1.0)
        } else {
            (left, w)
        };
        let mut base = 0.0;
        for (i, v) in values.iter().enumerate() {
            if !(v.is_finite() && *v > 0.0) {
                continue;
            }
            let class = c.categories.get(i).map_or("c5", |c| c.1);
            let name = c.categories.get(i).map_or("", |c| c.0.as_str());
            let top = ys.map(base + v);
            let bottom = ys.map(base);
            let _ = write!(
                out,
                "<rect class=\"bar {class}\" x=\"{left:.1}\" y=\"{top:.1}\" width=\"{w:.1}\" height=\"{:.1}\">\
                 <title>{} {}: {}</title></rect>",
                (bottom - top).max(0.0),
                clock(*a, true),
                esc(name),
                num(*v)
            );
            base += v;
        }
    }
    let entries: Vec<(&str, &str, bool)> = c
        .categories
        .iter()
        .map(|(n, cl)| (n.as_str(), *cl, false))
        .collect();
    legend(&mut out, &entries);
    out.push_str("</svg>");
    out
}

/// A small line of `values` (oldest first) for a table cell; empty without two finite values.
pub fn sparkline(values: &[f64], y_max: Option<f64>) -> String {
    let v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if v.len() < 2 {
        return String::new();
    }
    let (w, h) = (90.0, 20.0);
    let hi = y_max.unwrap_or_else(|| v.iter().copied().fold(0.0, f64::max));
    let xs = Scale::new(0.0, (v.len() - 1) as f64, 1.0, w - 1.0);
    let ys = Scale::new(0.0, hi, h - 2.0, 2.0);
    let pts: Vec<String> = v
        .iter()
        .enumerate()
        .map(|(i, y)| {
            format!(
                "{:.1},{:.1}",
                xs.map(i as f64),
                ys.map(*y).clamp(1.0, h - 1.0)
            )
        })
        .collect();
    format!(
        "<svg class=\"spark\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" \
         width=\"{w}\" height=\"{h}\" data-points=\"{}\"><polyline class=\"series c1\" points=\"{}\"/></svg>",
        v.len(),
        pts.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_quotes_and_controls() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        assert_eq!(esc("a\u{0}b\u{1b}c"), "a\u{fffd}b\u{fffd}c");
        assert_eq!(esc("plain-id_1.2"), "plain-id_1.2");
    }

    #[test]
    fn scales_map_linearly_and_widen_a_single_value() {
        let s = Scale::new(0.0, 10.0, 100.0, 0.0);
        assert_eq!(s.map(0.0), 100.0);
        assert_eq!(s.map(10.0), 0.0);
        assert_eq!(s.map(2.5), 75.0);
        // One value: it lands in the middle.
        let one = Scale::new(5.0, 5.0, 0.0, 100.0);
        assert!((one.map(5.0) - 50.0).abs() < 1e-9);
        let zero = Scale::new(0.0, 0.0, 0.0, 100.0);
        assert!((zero.map(0.0) - 50.0).abs() < 1e-9);
        // Garbage bounds fall back to [0, 1]; reversed ones are ordered.
        assert_eq!(Scale::new(f64::NAN, 1.0, 0.0, 1.0).map(0.5), 0.5);
        assert_eq!(Scale::new(10.0, 0.0, 0.0, 1.0).map(10.0), 1.0);
    }

    #[test]
    fn ticks_are_round_and_inside() {
        assert_eq!(ticks(0.0, 1.0, 4), [0.0, 0.5, 1.0]);
        let fifths: Vec<String> = ticks(0.0, 1.0, 5).into_iter().map(num).collect();
        assert_eq!(fifths, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        assert_eq!(ticks(0.0, 100.0, 4), [0.0, 50.0, 100.0]);
        assert!(ticks(1.0, 1.0, 4).is_empty());
        assert!(ticks(0.0, f64::INFINITY, 4).is_empty());
        for t in ticks(0.13, 0.97, 5) {
            assert!((0.13..=0.97).contains(&t), "{t}");
        }
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(2.0), "2");
        assert_eq!(num(-0.0001), "0");
        assert_eq!(num(f64::NAN), "-");
        assert_eq!(clock(3_723_000.0, true), "01:02:03");
        assert_eq!(clock(86_400_000.0 + 60_000.0, false), "00:01");
    }

    fn chart(series: Vec<Series>) -> Chart {
        Chart {
            title: "Escalation <rate>".into(),
            unit: "%".into(),
            series,
            ..Chart::default()
        }
    }

    #[test]
    fn an_empty_chart_says_so() {
        let svg = line_chart(&chart(vec![Series::new("rate", "c0", Vec::new())]));
        assert!(svg.contains("data-points=\"0\""), "{svg}");
        assert!(svg.contains("no data yet"), "{svg}");
        assert!(!svg.contains("<polyline"), "{svg}");
        assert!(svg.contains("Escalation &lt;rate&gt; (%)"), "{svg}");
        assert!(svg.ends_with("</svg>"));
        let bars = stacked_bars(&Stacked {
            title: "t".into(),
            bars: vec![((0.0, 1.0), vec![0.0, f64::NAN])],
            ..Stacked::default()
        });
        assert!(
            bars.contains("no data yet") && bars.contains("data-points=\"0\""),
            "{bars}"
        );
        assert_eq!(sparkline(&[1.0], None), "");
    }

    #[test]
    fn one_point_is_drawn_as_a_dot_in_the_middle() {
        let svg = line_chart(&chart(vec![Series::new("rate", "c0", vec![(1000.0, 0.5)])]));
        assert!(svg.contains("data-points=\"1\""), "{svg}");
        let cx = (LEFT + WIDTH - RIGHT) / 2.0;
        assert!(
            svg.contains(&format!("<circle class=\"dot c0\" cx=\"{cx:.1}\"")),
            "{svg}"
        );
    }

    #[test]
    fn points_are_scaled_into_the_frame_and_names_escaped() {
        let s = Series::new(
            "<b>\"x\"</b>",
            "c1",
            vec![(0.0, 0.0), (50.0, 0.5), (100.0, 1.0), (f64::NAN, 3.0)],
        );
        assert_eq!(s.points.len(), 3, "non-finite points are dropped");
        let mut c = chart(vec![s]);
        c.y_min = Some(0.0);
        c.y_max = Some(1.0);
        c.markers = vec![Marker {
            x: 50.0,
            label: "push <0.8>".into(),
        }];
        c.hlines = vec![HLine {
            y: 2.0,
            label: "target".into(),
        }];
        let svg = line_chart(&c);
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
        let xm = (x0 + x1) / 2.0;
        let ym = (y0 + y1) / 2.0;
        let expect = format!("points=\"{x0:.1},{y0:.1} {xm:.1},{ym:.1} {x1:.1},{y1:.1}\"");
        assert!(svg.contains(&expect), "{expect} in {svg}");
        assert!(
            svg.contains("data-name=\"&lt;b&gt;&quot;x&quot;&lt;/b&gt;\""),
            "{svg}"
        );
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("class=\"marker\"") && svg.contains("push &lt;0.8&gt;"));
        // A reference line outside fixed bounds is clamped into the frame.
        assert!(
            svg.contains(&format!("class=\"hline\" x1=\"{LEFT}\" y1=\"{y1:.1}\"")),
            "{svg}"
        );
    }

    #[test]
    fn steps_hold_their_value_until_the_next() {
        let s = Series::new("t", "c2", vec![(0.0, 0.0), (100.0, 1.0)]).step();
        let mut c = chart(vec![s]);
        c.y_min = Some(0.0);
        c.y_max = Some(1.0);
        let svg = line_chart(&c);
        let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
        assert!(
            svg.contains(&format!(
                "points=\"{x0:.1},{y0:.1} {x1:.1},{y0:.1} {x1:.1},{y1:.1}\""
            )),
            "{svg}"
        );
    }

    #[test]
    fn bars_stack_their_categories() {
        let svg = stacked_bars(&Stacked {
            title: "mix".into(),
            unit: "requests".into(),
            categories: vec![("edge".into(), "c0"), ("<cloud>".into(), "c1")],
            bars: vec![
                ((0.0, 10.0), vec![3.0, 1.0]),
                ((10.0, 20.0), vec![2.0, 2.0]),
            ],
            x_range: Some((0.0, 20.0)),
        });
        assert!(svg.contains("data-points=\"2\""), "{svg}");
        assert_eq!(svg.matches("<rect class=\"bar").count(), 4, "{svg}");
        assert!(svg.contains("&lt;cloud&gt;") && !svg.contains("<cloud>"));
        // The tallest stack (4) reaches 1/1.06 of the plot's height.
        let y_top = Scale::new(0.0, 4.0 * 1.06, HEIGHT - BOTTOM, TOP).map(4.0);
        assert!(svg.contains(&format!("y=\"{y_top:.1}\"")), "{svg}");
    }

    #[test]
    fn sparklines_fit_their_box() {
        let s = sparkline(&[0.0, 0.5, 1.0, f64::NAN], Some(1.0));
        assert!(s.contains("data-points=\"3\""), "{s}");
        assert!(s.contains("points=\"1.0,18.0 45.0,10.0 89.0,2.0\""), "{s}");
    }
}

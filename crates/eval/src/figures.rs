//! Every figure of the report, drawn with `plotters`: a small vocabulary of figure kinds —
//! [`Lines`] (curves with bands, shaded spans and marks; ROC curves), [`Histogram`] (stacked
//! by group) and [`Heatmap`] (a colour map with its colour bar, optional tick names, cell counts
//! and labelled blocks) — each saved as a PNG and an SVG beside it by [`save`].
//!
//! Why here, in one module: a figure a reader cannot read (no axes, no legend) cannot be cited
//! or checked, and one place that knows the conventions (a title, labelled axes with units,
//! ticks, a legend where several series share a chart) makes a new figure a few lines. The font
//! (DejaVu Sans, `fonts/`, its licence beside it) is compiled in, so figures render the same on
//! a fresh machine with no system fonts.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

/// The family every text of a figure uses; registered from the embedded font.
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Series colours (Tableau 10, colour-blind friendlier than primaries), in legend order.
pub const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn colour(k: usize) -> RGBColor {
    COLOURS[k % COLOURS.len()]
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType file, compiled in; failing here is a build defect.
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans does not parse"));
    });
}

/// What a figure is drawn with, whatever the backend.
type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A figure kind: its size in pixels and how it draws itself on any backend.
pub trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// Draws `figure` into `png` and into the SVG of the same name beside it.
pub fn save(figure: &impl Figure, png: &Path) -> std::io::Result<()> {
    register_font();
    let (w, h) = figure.size();
    let fail = |e: String| std::io::Error::other(format!("drawing {}: {e}", png.display()));
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        figure.draw(&root).map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    image::RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| fail("pixel buffer of the wrong size".into()))?
        .save(png)
        .map_err(std::io::Error::other)?;
    let svg = png.with_extension("svg");
    let root = SVGBackend::new(&svg, (w, h)).into_drawing_area();
    figure.draw(&root).map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))
}

fn text(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().color(&BLACK)
}

/// One curve of a [`Lines`] figure.
#[derive(Debug, Clone, Default)]
pub struct Line {
    /// Its legend entry.
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// `(x, low, high)`: a shaded band around it (e.g. min–max over seeds); empty for none.
    pub band: Vec<(f64, f64, f64)>,
    /// Draw a dot at each point.
    pub markers: bool,
}

/// Curves over a shared x axis: training curves, F1 per epoch, ROC curves.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    /// Axis ranges; `None`: the data's, with a margin.
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    /// Shaded x intervals and what they are (one legend entry), e.g. the graph epochs.
    pub spans: Vec<(f64, f64)>,
    pub span_label: String,
    /// Vertical lines with a label at the top, e.g. the step 3a / 3b boundary.
    pub marks: Vec<(f64, String)>,
    /// The chance line `y = x` (ROC curves).
    pub diagonal: bool,
    /// Whole-number x ticks (epochs).
    pub x_integer: bool,
    /// Room above the data for the legend, as a fraction of the data's range (then the legend
    /// sits at the top right; without, at the bottom right).
    pub headroom: f64,
}

fn data_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

impl Figure for Lines {
    fn size(&self) -> (u32, u32) {
        (900, 520)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let xs = self.lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
        let (x0, x1) = self.x_range.unwrap_or_else(|| data_range(xs));
        let ys = self.lines.iter().flat_map(|l| {
            l.points
                .iter()
                .map(|p| p.1)
                .chain(l.band.iter().flat_map(|b| [b.1, b.2]))
        });
        let (y0, y1) = self.y_range.unwrap_or_else(|| {
            let (lo, hi) = data_range(ys);
            (lo, hi + self.headroom * (hi - lo))
        });
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, text(22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let integer = |x: &f64| format!("{x:.0}");
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(text(15))
            .axis_desc_style(text(17))
            .light_line_style(RGBColor(238, 238, 238));
        if self.x_integer {
            mesh.x_label_formatter(&integer)
                .x_labels(((x1 - x0).round() as usize + 1).min(20));
        }
        mesh.draw()?;
        if !self.spans.is_empty() {
            let shade = RGBColor(225, 225, 225).mix(0.6).filled();
            chart
                .draw_series(
                    self.spans
                        .iter()
                        .map(|&(a, b)| Rectangle::new([(a, y0), (b, y1)], shade)),
                )?
                .label(&self.span_label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 20, y + 6)], shade));
        }
        if self.diagonal {
            chart
                .draw_series(LineSeries::new(
                    [(x0.max(y0), x0.max(y0)), (x1.min(y1), x1.min(y1))],
                    BLACK.mix(0.4).stroke_width(1),
                ))?
                .label("chance")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.4)));
        }
        for (x, label) in &self.marks {
            chart.draw_series(LineSeries::new([(*x, y0), (*x, y1)], BLACK.stroke_width(1)))?;
            let at = chart.plotting_area().map_coordinate(&(*x, y1));
            root.draw(&Text::new(label.clone(), (at.0 + 4, at.1 + 4), text(14)))?;
        }
        for (k, line) in self.lines.iter().enumerate() {
            let c = colour(k);
            if !line.band.is_empty() {
                let outline: Vec<(f64, f64)> = line
                    .band
                    .iter()
                    .map(|b| (b.0, b.1))
                    .chain(line.band.iter().rev().map(|b| (b.0, b.2)))
                    .collect();
                chart.draw_series(std::iter::once(Polygon::new(outline, c.mix(0.18).filled())))?;
            }
            chart
                .draw_series(LineSeries::new(line.points.clone(), c.stroke_width(2)))?
                .label(&line.name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
            if line.markers {
                chart.draw_series(line.points.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
        }
        chart
            .configure_series_labels()
            .position(if self.headroom > 0.0 {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .label_font(text(15))
            .draw()?;
        Ok(())
    }
}

/// Stacked histograms of several groups over equal bins of one range.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// The binned range; values outside are counted in the end bins.
    pub range: (f64, f64),
    pub bins: usize,
    /// `(legend name, values)`, stacked in this order from the bottom.
    pub groups: Vec<(String, Vec<f64>)>,
}

impl Histogram {
    /// The counts per group and bin.
    pub fn counts(&self) -> Vec<Vec<u32>> {
        let (lo, hi) = self.range;
        let bins = self.bins.max(1);
        self.groups
            .iter()
            .map(|(_, values)| {
                let mut c = vec![0u32; bins];
                for &v in values {
                    let b = ((v - lo) / (hi - lo) * bins as f64)
                        .floor()
                        .clamp(0.0, bins as f64 - 1.0) as usize;
                    c[b] += 1;
                }
                c
            })
            .collect()
    }
}

impl Figure for Histogram {
    fn size(&self) -> (u32, u32) {
        (640, 420)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let counts = self.counts();
        let bins = self.bins.max(1);
        let (lo, hi) = self.range;
        let width = (hi - lo) / bins as f64;
        let tallest = (0..bins)
            .map(|b| counts.iter().map(|c| c[b]).sum::<u32>())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, text(20))
            .margin(12)
            .x_label_area_size(46)
            .y_label_area_size(56)
            .build_cartesian_2d(lo..hi, 0f64..tallest as f64 * 1.08)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(text(14))
            .axis_desc_style(text(16))
            .light_line_style(RGBColor(238, 238, 238))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        let mut base = vec![0u32; bins];
        for (k, ((name, values), c)) in self.groups.iter().zip(&counts).enumerate() {
            if values.is_empty() {
                continue;
            }
            let fill = colour(k).filled();
            let bars: Vec<Rectangle<(f64, f64)>> = (0..bins)
                .filter(|&b| c[b] > 0)
                .map(|b| {
                    let x = lo + b as f64 * width;
                    let (y0, y1) = (base[b] as f64, (base[b] + c[b]) as f64);
                    Rectangle::new([(x + width * 0.05, y0), (x + width * 0.95, y1)], fill)
                })
                .collect();
            for b in 0..bins {
                base[b] += c[b];
            }
            chart
                .draw_series(bars)?
                .label(format!("{name} ({})", values.len()))
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], fill));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .label_font(text(14))
            .draw()?;
        Ok(())
    }
}

/// A matrix as a colour map (viridis) with its colour bar.
#[derive(Debug, Clone, Default)]
pub struct Heatmap {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// `values[row][col]`; row 0 at the top.
    pub values: Vec<Vec<f64>>,
    /// What the colour means, with its unit (the colour bar's label).
    pub value_label: String,
    /// The colour scale; `None`: the data's minimum and maximum.
    pub value_range: Option<(f64, f64)>,
    /// Names of the rows and columns as tick labels (confusion matrices); `None`: indices.
    pub names: Option<Vec<String>>,
    /// Write each cell's value in it (counts).
    pub annotate: bool,
    /// `(first index, label)` of consecutive blocks of rows and columns, drawn as lines with
    /// their labels above the map (e.g. web images ordered by noise kind).
    pub blocks: Vec<(usize, String)>,
}

impl Figure for Heatmap {
    fn size(&self) -> (u32, u32) {
        if self.names.is_some() {
            (820, 760)
        } else {
            (760, 700)
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let (w, _) = self.size();
        let (map_area, bar_area) = root.split_horizontally(w - 110);
        let rows = self.values.len().max(1);
        let cols = self.values.first().map_or(1, |r| r.len().max(1));
        let (vmin, vmax) = self.value_range.unwrap_or_else(|| {
            let (a, b) = self
                .values
                .iter()
                .flatten()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            if a.is_finite() && b > a {
                (a, b)
            } else {
                (0.0, 1.0)
            }
        });
        let scale = |v: f64| ((v - vmin) / (vmax - vmin)).clamp(0.0, 1.0);
        let label_size = if self.names.is_some() { 140 } else { 56 };
        // The title above, then room for the blocks' labels.
        let title_style = text(20).pos(Pos::new(HPos::Center, VPos::Top));
        root.draw(&Text::new(
            self.title.clone(),
            ((w - 110) as i32 / 2, 8),
            title_style,
        ))?;
        let top = if self.blocks.is_empty() { 40 } else { 62 };
        let mut chart = ChartBuilder::on(&map_area)
            .margin(10)
            .margin_top(top)
            .x_label_area_size(label_size)
            .y_label_area_size(label_size)
            .build_cartesian_2d(0f64..cols as f64, rows as f64..0f64)?;
        let names = self.names.clone().unwrap_or_default();
        let name_at = |v: &f64| -> String {
            let i = v.floor();
            if (v - i - 0.5).abs() < 1e-6 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let index = |v: &f64| format!("{v:.0}");
        let mut mesh = chart.configure_mesh();
        mesh.disable_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(text(13))
            .axis_desc_style(text(16));
        if self.names.is_some() {
            // One tick at the centre of every cell.
            mesh.x_labels(cols * 2 + 1)
                .y_labels(rows * 2 + 1)
                .x_label_formatter(&name_at)
                .y_label_formatter(&name_at);
            if cols > 8 {
                // Many columns: the names are drawn below, running downwards.
                mesh.x_label_formatter(&|_| String::new());
            }
        } else {
            mesh.x_label_formatter(&index).y_label_formatter(&index);
        }
        mesh.draw()?;
        if self.names.is_some() && cols > 8 {
            for (j, name) in self.names.iter().flatten().enumerate().take(cols) {
                let at = chart
                    .plotting_area()
                    .map_coordinate(&(j as f64 + 0.5, rows as f64));
                let style = text(12)
                    .transform(FontTransform::Rotate90)
                    .pos(Pos::new(HPos::Left, VPos::Center));
                root.draw(&Text::new(name.clone(), (at.0, at.1 + 8), style))?;
            }
        }
        chart.draw_series(self.values.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &v)| {
                let c = ViridisRGB::get_color(scale(v));
                Rectangle::new(
                    [(j as f64, i as f64), (j as f64 + 1.0, i as f64 + 1.0)],
                    c.filled(),
                )
            })
        }))?;
        if self.annotate {
            for (i, row) in self.values.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let ink = if scale(v) > 0.6 { BLACK } else { WHITE };
                    let at = chart
                        .plotting_area()
                        .map_coordinate(&(j as f64 + 0.5, i as f64 + 0.5));
                    let style = text(13)
                        .color(&ink)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    root.draw(&Text::new(format!("{v:.0}"), at, style))?;
                }
            }
        }
        for (k, (start, label)) in self.blocks.iter().enumerate() {
            let s = *start as f64;
            if *start > 0 {
                let edge = WHITE.stroke_width(2);
                chart.draw_series(LineSeries::new([(s, 0.0), (s, rows as f64)], edge))?;
                chart.draw_series(LineSeries::new([(0.0, s), (cols as f64, s)], edge))?;
            }
            let end = self.blocks.get(k + 1).map_or(cols, |b| b.0) as f64;
            let at = chart
                .plotting_area()
                .map_coordinate(&((s + end) / 2.0, 0.0));
            let style = text(13).pos(Pos::new(HPos::Center, VPos::Bottom));
            root.draw(&Text::new(label.clone(), (at.0, at.1 - 4), style))?;
        }
        // The colour bar, on the map's vertical extent.
        let (_, map_rows) = chart.plotting_area().get_pixel_range();
        let bar_top = map_rows.start.max(0) as u32;
        let mut bar = ChartBuilder::on(&bar_area)
            .margin_top(bar_top)
            .margin_bottom(label_size + 10)
            .margin_right(10)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..1f64, vmin..vmax)?;
        let digits = if vmax - vmin >= 20.0 { 0 } else { 2 };
        let tick = |v: &f64| format!("{v:.digits$}");
        bar.configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_label_formatter(&tick)
            .y_desc(&self.value_label)
            .label_style(text(13))
            .axis_desc_style(text(15))
            .draw()?;
        let steps = 100;
        bar.draw_series((0..steps).map(|s| {
            let (a, b) = (s as f64 / steps as f64, (s + 1) as f64 / steps as f64);
            let c = ViridisRGB::get_color((a + b) / 2.0);
            Rectangle::new(
                [
                    (0.0, vmin + a * (vmax - vmin)),
                    (1.0, vmin + b * (vmax - vmin)),
                ],
                c.filled(),
            )
        }))?;
        Ok(())
    }
}

/// The ROC curve of `scores` against `positive` (higher score = more likely positive): points
/// `(false-positive rate, true-positive rate)` from (0, 0) to (1, 1), ties taken together, and
/// the area under it, `simtrans_denoise::auc::roc_auc` (the AUC `eval.json` reports; ties count
/// one half, as the curve's trapezoids do). `None` without both classes.
pub fn roc_curve(scores: &[f32], positive: &[bool]) -> Option<(Vec<(f64, f64)>, f64)> {
    let auc = simtrans_denoise::auc::roc_auc(scores, positive).ok()??;
    let p = positive.iter().filter(|&&b| b).count();
    let n = positive.len() - p;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let s = scores[order[i]];
        while i < order.len() && scores[order[i]] == s {
            if positive[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        points.push((fp as f64 / n as f64, tp as f64 / p as f64));
    }
    Some((points, auc))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a region of an image holds something other than the background.
    fn inked(img: &image::RgbImage, xs: std::ops::Range<u32>, ys: std::ops::Range<u32>) -> bool {
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .any(|(x, y)| img.get_pixel(x, y).0 != [255, 255, 255])
    }

    /// The PNG exists at the figure's size, with ink in the plotting area, below it (the x
    /// axis and its label) and left of it (the y axis), and an SVG beside it with text in it.
    fn check(figure: &impl Figure, name: &str) {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join(format!("{name}.png"));
        save(figure, &png).unwrap();
        let img = image::open(&png).unwrap().to_rgb8();
        let (w, h) = figure.size();
        assert_eq!(img.dimensions(), (w, h), "{name}");
        assert!(
            inked(&img, w / 3..w / 2, h / 3..h / 2),
            "{name}: empty plot area"
        );
        assert!(
            inked(&img, w / 4..w * 3 / 4, h - 60..h),
            "{name}: no x axis"
        );
        assert!(inked(&img, 0..70, h / 4..h * 3 / 4), "{name}: no y axis");
        let svg = std::fs::read_to_string(png.with_extension("svg")).unwrap();
        assert!(svg.contains("<text"), "{name}: no text in the SVG");
    }

    #[test]
    fn lines_render_with_axes_bands_spans_and_legend() {
        let fig = Lines {
            title: "novel test top-1".into(),
            x_label: "epoch".into(),
            y_label: "top-1 (%)".into(),
            lines: vec![
                Line {
                    name: "naive".into(),
                    points: vec![(0.0, 60.0), (1.0, 70.0), (2.0, 75.0)],
                    band: vec![(0.0, 55.0, 65.0), (1.0, 66.0, 74.0), (2.0, 73.0, 77.0)],
                    markers: true,
                },
                Line {
                    name: "full".into(),
                    points: vec![(0.0, 62.0), (1.0, 71.0), (2.0, 78.0)],
                    ..Line::default()
                },
            ],
            spans: vec![(1.5, 2.5)],
            span_label: "graph epoch".into(),
            marks: vec![(1.0, "3b".into())],
            ..Lines::default()
        };
        check(&fig, "lines");
        let svg_dir = tempfile::tempdir().unwrap();
        let png = svg_dir.path().join("l.png");
        save(&fig, &png).unwrap();
        let svg = std::fs::read_to_string(png.with_extension("svg")).unwrap();
        for word in [
            "novel test top-1",
            "epoch",
            "naive",
            "full",
            "graph epoch",
            "3b",
        ] {
            assert!(svg.contains(word), "the SVG lacks `{word}`");
        }
    }

    #[test]
    fn histograms_stack_their_groups() {
        let fig = Histogram {
            title: "weights".into(),
            x_label: "weight".into(),
            y_label: "images".into(),
            range: (0.0, 2.0),
            bins: 4,
            groups: vec![
                ("clean".into(), vec![0.9, 1.1, 1.2, 3.0]),
                ("open-set".into(), vec![0.1, -1.0]),
            ],
        };
        assert_eq!(fig.counts(), vec![vec![0, 1, 2, 1], vec![2, 0, 0, 0]]);
        check(&fig, "histogram");
    }

    #[test]
    fn heatmaps_render_names_counts_blocks_and_a_colour_bar() {
        let values = vec![
            vec![5.0, 1.0, 0.0],
            vec![2.0, 7.0, 1.0],
            vec![0.0, 0.0, 9.0],
        ];
        let fig = Heatmap {
            title: "confusion".into(),
            x_label: "predicted".into(),
            y_label: "true".into(),
            values: values.clone(),
            value_label: "test images".into(),
            names: Some(vec!["Shirt".into(), "Coat".into(), "Bag".into()]),
            annotate: true,
            ..Heatmap::default()
        };
        check(&fig, "confusion");
        let many = Heatmap {
            values: vec![vec![1.0; 12]; 12],
            names: Some((0..12).map(|i| format!("class number {i}")).collect()),
            ..fig.clone()
        };
        check(&many, "many classes");
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("c.png");
        save(&fig, &png).unwrap();
        let svg = std::fs::read_to_string(png.with_extension("svg")).unwrap();
        for word in ["Shirt", "Coat", "Bag", "predicted", "test images", "\n9\n"] {
            assert!(svg.contains(word), "the SVG lacks `{word}`");
        }
        // The colour bar, right of the map, is drawn.
        let img = image::open(&png).unwrap().to_rgb8();
        let (w, h) = fig.size();
        assert!(inked(&img, w - 100..w - 60, h / 3..h / 2), "no colour bar");
        let blocks = Heatmap {
            names: None,
            annotate: false,
            blocks: vec![(0, "clean".into()), (2, "open-set".into())],
            ..fig
        };
        check(&blocks, "blocks");
    }

    #[test]
    fn roc_curves_and_their_area() {
        let (points, auc) = roc_curve(&[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]).unwrap();
        assert_eq!(auc, 1.0);
        assert_eq!(points.first(), Some(&(0.0, 0.0)));
        assert_eq!(points.last(), Some(&(1.0, 1.0)));
        let (_, tie) = roc_curve(&[0.5, 0.5], &[true, false]).unwrap();
        assert_eq!(tie, 0.5);
        let (_, worst) = roc_curve(&[0.1, 0.9], &[true, false]).unwrap();
        assert_eq!(worst, 0.0);
        assert!(roc_curve(&[0.1], &[true]).is_none());
        // The reported area is the curve's: trapezoids under the points, ties included.
        let (points, auc) = roc_curve(
            &[0.9, 0.7, 0.7, 0.4, 0.4, 0.2],
            &[true, false, true, true, false, false],
        )
        .unwrap();
        let area: f64 = points
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum();
        assert!((area - auc).abs() < 1e-12, "{area} vs {auc}");
    }
}

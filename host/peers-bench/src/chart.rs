//! The table as a PNG: one panel per network size, a group of bars (one per system) for each
//! point of clients and where they connect; with several rounds, each bar is the median.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::Mode;
use crate::summary::Row;

/// Fonts the chart can use, in order (Debian: fonts-dejavu-core, fonts-liberation).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

const COLOURS: &[RGBColor] = &[RGBColor(90, 90, 90), RGBColor(31, 119, 180), RGBColor(255, 127, 14)];

pub fn draw(rows: &[Row], path: &Path) -> anyhow::Result<()> {
    let font = FONTS
        .iter()
        .find_map(|f| std::fs::read(f).ok())
        .with_context(|| format!("no font found (looked for {})", FONTS.join(", ")))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("the font does not load"))?;

    let mut systems: Vec<&str> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    for r in rows {
        if !systems.contains(&r.system) {
            systems.push(r.system);
        }
        if !sizes.contains(&r.nodes) {
            sizes.push(r.nodes);
        }
    }
    let root = BitMapBackend::new(path, (1400, 460 * sizes.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    for (panel, &nodes) in root.split_evenly((sizes.len(), 1)).iter().zip(&sizes) {
        let mut groups: Vec<(Mode, usize)> = Vec::new();
        for r in rows.iter().filter(|r| r.nodes == nodes) {
            if !groups.contains(&(r.mode, r.clients)) {
                groups.push((r.mode, r.clients));
            }
        }
        let top = rows.iter().filter(|r| r.nodes == nodes).map(|r| r.per_second).fold(1.0, f64::max) * 1.15;
        let labels = groups.clone();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{nodes} node(s): writes per second (higher is better)"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(72)
            .build_cartesian_2d(-0.5f64..groups.len() as f64 - 0.5, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(groups.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                match labels.get(i as usize) {
                    Some((mode, clients)) if (x - i).abs() < 1e-6 && i >= 0.0 => {
                        let who = if *clients == 1 { "client" } else { "clients" };
                        format!("{clients} {who}, {}", mode.name())
                    }
                    _ => String::new(),
                }
            })
            .y_desc("ops/s")
            .label_style(("sans-serif", 15))
            .draw()?;
        let width = 0.8 / systems.len() as f64;
        for (s, system) in systems.iter().enumerate() {
            let colour = COLOURS[s % COLOURS.len()];
            let bars = groups.iter().enumerate().filter_map(|(g, (mode, clients))| {
                let r = rows
                    .iter()
                    .find(|r| r.system == *system && r.nodes == nodes && r.mode == *mode && r.clients == *clients)?;
                let left = g as f64 - 0.4 + s as f64 * width;
                Some(Rectangle::new([(left, 0.0), (left + width * 0.9, r.per_second)], colour.filled()))
            });
            chart
                .draw_series(bars)?
                .label(*system)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

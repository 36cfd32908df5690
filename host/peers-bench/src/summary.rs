//! From every round's points to the table: one row per system and point, with medians over the
//! rounds, and each Cloister figure over etcd's as the median of the rounds' own ratios (each
//! round's Cloister point against the etcd point measured just before it), with their range;
//! and each point of another mode over the same system's point through the leader, likewise.
//! With `--compare`, a second table gives each point on the compared binary over the same point
//! on the first one, likewise.

use serde::Serialize;

use crate::{Mode, Point, cpu};

/// One system at one point, over every round.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: &'static str,
    pub nodes: usize,
    pub mode: Mode,
    pub clients: usize,
    pub rounds: usize,
    /// Medians over the rounds.
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Failed requests, summed over the rounds.
    pub errors: u64,
    /// Throughput over etcd's (above 1 favours Cloister); none for etcd, or with no etcd point.
    pub rate_vs_etcd: Option<Spread>,
    /// p50 over etcd's (below 1 favours Cloister).
    pub p50_vs_etcd: Option<Spread>,
    /// Throughput over the same system's through the leader at the same point, in each round
    /// that measured both: the cost of the mode's hop. None for the leader mode itself.
    pub rate_vs_leader: Option<Spread>,
    /// The server processes' CPU time per request, together, in microseconds (median over the
    /// rounds that have CPU figures).
    pub servers_cpu_us: Option<f64>,
    /// The share of the machine's CPU time that was busy (median, 0 to 1).
    pub machine_busy: Option<f64>,
}

/// A ratio over the rounds that measured both systems.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Option<Spread> {
        Some(Spread {
            median: median(values)?,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    /// A table cell: [`Spread::text`], or empty for no spread.
    pub(crate) fn cell(spread: Option<Spread>) -> String {
        spread.map(Spread::text).unwrap_or_default()
    }

    /// The median, and the range where the rounds differ.
    pub(crate) fn text(self) -> String {
        if self.min == self.max {
            format!("{:.2}", self.median)
        } else {
            format!("{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
        }
    }
}

/// The middle value, or the mean of the two middle ones; none of nothing.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn same_point(a: &Point, b: &Point) -> bool {
    a.nodes == b.nodes && a.mode == b.mode && a.clients == b.clients
}

/// The first round's point of each system and point, in the order they ran.
fn firsts(points: &[Point]) -> impl Iterator<Item = &Point> {
    points
        .iter()
        .enumerate()
        .filter(|(i, p)| !points[..*i].iter().any(|q| q.system == p.system && same_point(q, p)))
        .map(|(_, p)| p)
}

/// Every round's point of `system` at this network size, mode and client count.
pub(crate) fn rounds_at<'p>(
    points: &'p [Point],
    system: &'p str,
    nodes: usize,
    mode: Mode,
    clients: usize,
) -> impl Iterator<Item = &'p Point> {
    points.iter().filter(move |q| q.system == system && q.nodes == nodes && q.mode == mode && q.clients == clients)
}

/// Every round's point of `first`'s system at `first`'s point.
fn rounds_of<'p>(points: &'p [Point], first: &'p Point) -> Vec<&'p Point> {
    rounds_at(points, first.system, first.nodes, first.mode, first.clients).collect()
}

/// `system`'s point at this network size, mode and client count, measured in `round`.
pub(crate) fn point_of<'p>(
    points: &'p [Point],
    system: &'p str,
    nodes: usize,
    mode: Mode,
    clients: usize,
    round: u32,
) -> Option<&'p Point> {
    rounds_at(points, system, nodes, mode, clients).find(|q| q.round == round)
}

/// The point `p` is paired with for a ratio: `system`'s through `mode`, at `p`'s network size and
/// client count, measured in `p`'s round.
fn partner<'p>(points: &'p [Point], p: &Point, system: &'p str, mode: Mode) -> Option<&'p Point> {
    point_of(points, system, p.nodes, mode, p.clients, p.round)
}

/// One row per system and point, in the order the points first ran.
pub fn rows(points: &[Point]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for first in firsts(points) {
        let own = rounds_of(points, first);
        let of = |f: fn(&Point) -> f64| median(&own.iter().map(|p| f(p)).collect::<Vec<_>>()).unwrap_or_default();
        let of_cpu =
            |f: fn(&cpu::Usage) -> f64| median(&own.iter().filter_map(|p| p.cpu.as_ref().map(f)).collect::<Vec<_>>());
        let (mut rates, mut p50s) = (Vec::new(), Vec::new());
        if first.system != "etcd" {
            for p in &own {
                if let Some(e) = partner(points, p, "etcd", p.mode) {
                    rates.push(p.per_second / e.per_second.max(1e-9));
                    p50s.push(p.p50_ms / e.p50_ms.max(1e-9));
                }
            }
        }
        let vs_leader: Vec<f64> = own
            .iter()
            .filter(|p| p.mode != Mode::Leader)
            .filter_map(|p| {
                let leader = partner(points, p, p.system, Mode::Leader)?;
                Some(p.per_second / leader.per_second.max(1e-9))
            })
            .collect();
        rows.push(Row {
            system: first.system,
            nodes: first.nodes,
            mode: first.mode,
            clients: first.clients,
            rounds: own.len(),
            per_second: of(|p| p.per_second),
            p50_ms: of(|p| p.p50_ms),
            p99_ms: of(|p| p.p99_ms),
            p999_ms: of(|p| p.p999_ms),
            max_ms: of(|p| p.max_ms),
            errors: own.iter().map(|p| p.errors).sum(),
            rate_vs_etcd: Spread::of(&rates),
            p50_vs_etcd: Spread::of(&p50s),
            rate_vs_leader: Spread::of(&vs_leader),
            servers_cpu_us: of_cpu(cpu::Usage::servers_us),
            machine_busy: of_cpu(|u| u.machine_busy),
        });
    }
    rows
}

/// What a system run on `--compare`'s binary adds to its twin's name.
const COMPARED: &str = " (compared)";

/// The system on `--cloister` that `system`, run on `--compare`'s binary, is compared with.
pub fn compared_base(system: &str) -> Option<&str> {
    system.strip_suffix(COMPARED)
}

/// A point on `--compare`'s binary over the same point on `--cloister`'s, in each round that
/// measured both (the two run back to back).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The system on `--cloister`.
    pub system: String,
    pub nodes: usize,
    pub mode: Mode,
    pub clients: usize,
    /// Rounds that measured both.
    pub rounds: usize,
    /// Throughput over the first binary's (above 1 favours the compared one).
    pub rate: Option<Spread>,
    /// Server CPU time per request over the first binary's (below 1 favours the compared one).
    pub cpu: Option<Spread>,
    /// p50 over the first binary's (below 1 favours the compared one).
    pub p50: Option<Spread>,
}

/// One comparison per compared system and point, in the order the points first ran.
pub fn comparisons(points: &[Point]) -> Vec<Comparison> {
    let mut out: Vec<Comparison> = Vec::new();
    for first in firsts(points) {
        let Some(base) = compared_base(first.system) else { continue };
        let (mut rates, mut cpus, mut p50s) = (Vec::new(), Vec::new(), Vec::new());
        for p in rounds_of(points, first) {
            let Some(a) = partner(points, p, base, p.mode) else { continue };
            rates.push(p.per_second / a.per_second.max(1e-9));
            p50s.push(p.p50_ms / a.p50_ms.max(1e-9));
            if let (Some(b_cpu), Some(a_cpu)) = (&p.cpu, &a.cpu) {
                cpus.push(b_cpu.servers_us() / a_cpu.servers_us().max(1e-9));
            }
        }
        out.push(Comparison {
            system: base.to_owned(),
            nodes: first.nodes,
            mode: first.mode,
            clients: first.clients,
            rounds: rates.len(),
            rate: Spread::of(&rates),
            cpu: Spread::of(&cpus),
            p50: Spread::of(&p50s),
        });
    }
    out
}

/// The comparisons as a Markdown table, led by a line saying what its figures are.
pub fn comparison_table(comparisons: &[Comparison]) -> String {
    let lines = comparisons.iter().map(|c| {
        vec![
            c.system.clone(),
            c.nodes.to_string(),
            c.mode.name().to_owned(),
            c.clients.to_string(),
            c.rounds.to_string(),
            Spread::cell(c.rate),
            Spread::cell(c.cpu),
            Spread::cell(c.p50),
        ]
    });
    let header = [
        "system",
        "nodes",
        "clients to",
        "clients",
        "rounds",
        "ops/s ÷ first",
        "server CPU µs/op ÷ first",
        "p50 ÷ first",
    ];
    "`--compare`'s binary over `--cloister`'s, point by point: the median of the rounds' own ratios, with their \
     range.\n\n"
        .to_owned()
        + &markdown(&header, lines)
}

/// The Markdown table, led by a line saying what its figures are.
pub fn table(rows: &[Row], rounds: u32) -> String {
    let lead = if rounds > 1 {
        format!("Medians of {rounds} rounds; each ratio is the median of the rounds' own ratios, with their range.\n\n")
    } else {
        String::from("One round.\n\n")
    };
    let lines = rows.iter().map(|r| {
        vec![
            r.system.to_owned(),
            r.nodes.to_string(),
            r.mode.name().to_owned(),
            r.clients.to_string(),
            format!("{:.0}", r.per_second),
            format!("{:.2}", r.p50_ms),
            format!("{:.2}", r.p99_ms),
            format!("{:.2}", r.p999_ms),
            format!("{:.1}", r.max_ms),
            Spread::cell(r.rate_vs_etcd),
            Spread::cell(r.p50_vs_etcd),
            Spread::cell(r.rate_vs_leader),
            r.servers_cpu_us.map(|us| format!("{us:.0}")).unwrap_or_default(),
            r.machine_busy.map(|b| format!("{:.0}%", b * 100.0)).unwrap_or_default(),
            r.errors.to_string(),
        ]
    });
    let header = [
        "system",
        "nodes",
        "clients to",
        "clients",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "ops/s ÷ etcd",
        "p50 ÷ etcd",
        "ops/s ÷ leader",
        "server CPU µs/op",
        "machine busy",
        "errors",
    ];
    lead + &markdown(&header, lines)
}

/// A Markdown table: the header's cells, the line under them, and each row's cells.
pub(crate) fn markdown(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut out = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for cells in rows {
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(system: &'static str, round: u32, clients: usize, per_second: f64, p50_ms: f64) -> Point {
        Point {
            system,
            nodes: 3,
            mode: Mode::Leader,
            clients,
            round,
            requests: 100,
            errors: u64::from(round == 2),
            per_second,
            p50_ms,
            p99_ms: p50_ms * 3.0,
            p999_ms: p50_ms * 5.0,
            max_ms: p50_ms * 10.0,
            cpu: (round != 3).then(|| cpu::Usage {
                per_process_us: vec![Some(100.0 * f64::from(round)), None],
                load_generator_us: 10.0,
                machine_busy: 0.5 + 0.1 * f64::from(round),
            }),
        }
    }

    #[test]
    fn a_median_is_the_middle_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[9.0, 1.0, 4.0]), Some(4.0));
        assert_eq!(median(&[9.0, 1.0, 4.0, 2.0]), Some(3.0));
    }

    #[test]
    fn each_ratio_pairs_a_round_with_the_etcd_point_of_the_same_round() {
        // etcd slows down in round 2 and Cloister with it: each round's ratio pairs the two
        // points of that round (0.5, 0.6 and 0.55), whatever the machine did between rounds.
        let points = vec![
            point("etcd", 1, 1, 1000.0, 1.0),
            point("kv", 1, 1, 500.0, 2.0),
            point("etcd", 1, 16, 4000.0, 4.0),
            point("kv", 1, 16, 4400.0, 3.0),
            point("etcd", 2, 1, 500.0, 2.0),
            point("kv", 2, 1, 300.0, 5.0),
            point("etcd", 2, 16, 2000.0, 8.0),
            point("kv", 2, 16, 2000.0, 8.0),
            point("etcd", 3, 1, 800.0, 1.0),
            point("kv", 3, 1, 440.0, 2.0),
        ];
        let rows = rows(&points);
        let names: Vec<_> = rows.iter().map(|r| (r.system, r.clients, r.rounds)).collect();
        assert_eq!(names, [("etcd", 1, 3), ("kv", 1, 3), ("etcd", 16, 2), ("kv", 16, 2)]);
        let kv1 = &rows[1];
        assert_eq!(kv1.per_second, 440.0);
        assert_eq!(kv1.p99_ms, 6.0);
        assert_eq!((kv1.p999_ms, kv1.max_ms), (10.0, 20.0));
        assert_eq!(kv1.errors, 1);
        // CPU figures from the two rounds that have them (round 3's are missing).
        assert_eq!(kv1.servers_cpu_us, Some(150.0));
        assert!((kv1.machine_busy.unwrap() - 0.65).abs() < 1e-9);
        let rate = kv1.rate_vs_etcd.unwrap();
        assert!((rate.median - 0.55).abs() < 1e-9 && rate.min == 0.5 && (rate.max - 0.6).abs() < 1e-9, "{rate:?}");
        assert_eq!(kv1.p50_vs_etcd, Some(Spread { median: 2.0, min: 2.0, max: 2.5 }));
        let kv16 = &rows[3];
        assert!((kv16.rate_vs_etcd.unwrap().median - 1.05).abs() < 1e-9);
        assert_eq!(rows[0].rate_vs_etcd, None);
    }

    #[test]
    fn each_mode_is_paired_with_the_leader_point_of_its_own_round() {
        let through =
            |mode: Mode, round: u32, per_second: f64| Point { mode, ..point("kv", round, 16, per_second, 1.0) };
        let points = vec![
            through(Mode::Leader, 1, 4000.0),
            through(Mode::Follower, 1, 3000.0),
            // The machine slows down in round 2; the follower's ratio follows its own round.
            through(Mode::Follower, 2, 1800.0),
            through(Mode::Leader, 2, 2000.0),
            // A round whose leader point is missing gives no ratio.
            through(Mode::Follower, 3, 9000.0),
        ];
        let rows = rows(&points);
        assert_eq!(rows[0].mode, Mode::Leader);
        assert_eq!(rows[0].rate_vs_leader, None, "the leader against itself says nothing");
        let follower = rows[1].rate_vs_leader.unwrap();
        assert!((follower.median - 0.825).abs() < 1e-9, "{follower:?}");
        assert_eq!((follower.min, follower.max), (0.75, 0.9));
        let table = table(&rows, 3);
        assert!(table.contains("| 0.82 (0.75–0.90) |"), "{table}");
    }

    #[test]
    fn a_compared_point_is_paired_with_its_twin_of_the_same_round() {
        let b = "kv (compared)";
        let points = vec![
            point("kv", 1, 16, 4000.0, 4.0),
            point(b, 1, 16, 4400.0, 3.0),
            // Round 2 runs the compared binary first; the machine is slower for both.
            point(b, 2, 16, 2100.0, 8.0),
            point("kv", 2, 16, 2000.0, 8.0),
            // A round whose twin is missing gives no ratio.
            point(b, 3, 16, 9000.0, 1.0),
            point("kv", 1, 1, 500.0, 2.0),
        ];
        let comparisons = comparisons(&points);
        assert_eq!(comparisons.len(), 1, "only the compared system's points are compared");
        let c = &comparisons[0];
        assert_eq!((c.system.as_str(), c.clients, c.rounds), ("kv", 16, 2));
        let rate = c.rate.unwrap();
        assert!((rate.median - 1.075).abs() < 1e-9 && rate.min == 1.05 && (rate.max - 1.1).abs() < 1e-9, "{rate:?}");
        assert_eq!(c.p50, Some(Spread { median: 0.875, min: 0.75, max: 1.0 }));
        // CPU per request: round 1's points have 100 µs each, round 2's 200 each.
        assert_eq!(c.cpu, Some(Spread { median: 1.0, min: 1.0, max: 1.0 }));
        let table = comparison_table(&comparisons);
        assert!(table.contains("| kv | 3 | leader | 16 | 2 | 1.08 (1.05–1.10) | 1.00 | 0.88 (0.75–1.00) |"), "{table}");
        assert_eq!(compared_base("kv"), None);
    }

    #[test]
    fn the_table_shows_a_range_only_where_the_rounds_differ() {
        let points = vec![
            point("etcd", 1, 1, 1000.0, 1.0),
            point("kv", 1, 1, 500.0, 2.0),
            point("etcd", 2, 1, 1000.0, 1.0),
            point("kv", 2, 1, 700.0, 2.0),
            point("reconcile", 3, 1, 100.0, 1.0),
        ];
        let table = table(&rows(&points), 2);
        assert!(table.starts_with("Medians of 2 rounds"), "{table}");
        assert!(
            table.contains(
                "| kv | 3 | leader | 1 | 600 | 2.00 | 6.00 | 10.00 | 20.0 | 0.60 (0.50–0.70) | 2.00 |  | 150 | 65% | 1 |"
            ),
            "{table}"
        );
        // A system whose etcd point is missing gets no ratio rather than a made-up one, and a
        // point without CPU figures gets none.
        assert!(
            table.contains("| reconcile | 3 | leader | 1 | 100 | 1.00 | 3.00 | 5.00 | 10.0 |  |  |  |  |  | 0 |"),
            "{table}"
        );
    }
}

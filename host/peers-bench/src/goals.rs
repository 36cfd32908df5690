//! The performance goals (issue #16, README "Against etcd"), judged on one run: each goal reads
//! the median of the rounds' own ratios, as the table does, and is met when that median lies on
//! its side of the goal's line. A goal is judged for every Cloister system it names (a
//! `--compare` twin too) and every mode the run measured it in, and only where the run has the
//! points it needs: a run without etcd, or without a 1-client point, judges fewer goals.

use serde::Serialize;

use crate::summary::{Row, Spread, compared_base, markdown, point_of, rounds_at};
use crate::{KV, Mode, Point, RECONCILE};

/// The goals are for 3-node networks.
const NODES: usize = 3;

/// Which side of its line a goal's figure must lie on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    AtLeast,
    AtMost,
}

/// What a goal asks of one figure of the table.
struct Goal {
    what: &'static str,
    /// The systems it is for (as `--cloister` names them).
    systems: &'static [&'static str],
    clients: usize,
    /// Only this mode, or every mode the run measured.
    mode: Option<Mode>,
    figure: Figure,
    side: Side,
    line: f64,
}

enum Figure {
    RateOverEtcd,
    P50OverEtcd,
    RateOverLeader,
    /// Throughput over the same system's 1-client point of the same round and mode.
    RateOverOneClient,
}

const GOALS: [Goal; 5] = [
    Goal {
        what: "256 clients: ops/s ≥ 1.0× etcd's",
        systems: &[KV[0]],
        clients: 256,
        mode: None,
        figure: Figure::RateOverEtcd,
        side: Side::AtLeast,
        line: 1.0,
    },
    Goal {
        what: "256 clients: ops/s ≥ 0.8× etcd's",
        systems: &[RECONCILE[0]],
        clients: 256,
        mode: None,
        figure: Figure::RateOverEtcd,
        side: Side::AtLeast,
        line: 0.8,
    },
    Goal {
        what: "1 client: p50 ≤ 1.2× etcd's",
        systems: &[KV[0], RECONCILE[0]],
        clients: 1,
        mode: None,
        figure: Figure::P50OverEtcd,
        side: Side::AtMost,
        line: 1.2,
    },
    Goal {
        what: "16 clients on one follower: ops/s ≥ 0.9× through the leader",
        systems: &[KV[0], RECONCILE[0]],
        clients: 16,
        mode: Some(Mode::Follower),
        figure: Figure::RateOverLeader,
        side: Side::AtLeast,
        line: 0.9,
    },
    Goal {
        what: "16 clients: ops/s ≥ 8× one client's",
        systems: &[KV[0], RECONCILE[0]],
        clients: 16,
        mode: None,
        figure: Figure::RateOverOneClient,
        side: Side::AtLeast,
        line: 8.0,
    },
];

/// One goal judged for one system in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub goal: &'static str,
    pub system: &'static str,
    pub mode: Mode,
    /// The figure: the median of the rounds' own ratios, and their range.
    pub reads: Spread,
    pub side: Side,
    pub line: f64,
    pub met: bool,
}

/// Every goal this run has the points for, in the order of [`GOALS`], then of the table's rows.
pub fn judge(rows: &[Row], points: &[Point]) -> Vec<Verdict> {
    let mut out = Vec::new();
    for goal in &GOALS {
        for row in rows {
            let base = compared_base(row.system).unwrap_or(row.system);
            if !goal.systems.contains(&base)
                || row.nodes != NODES
                || row.clients != goal.clients
                || goal.mode.is_some_and(|m| m != row.mode)
            {
                continue;
            }
            let reads = match goal.figure {
                Figure::RateOverEtcd => row.rate_vs_etcd,
                Figure::P50OverEtcd => row.p50_vs_etcd,
                Figure::RateOverLeader => row.rate_vs_leader,
                Figure::RateOverOneClient => over_one_client(points, row),
            };
            let Some(reads) = reads else { continue };
            let met = match goal.side {
                Side::AtLeast => reads.median >= goal.line,
                Side::AtMost => reads.median <= goal.line,
            };
            out.push(Verdict {
                goal: goal.what,
                system: row.system,
                mode: row.mode,
                reads,
                side: goal.side,
                line: goal.line,
                met,
            });
        }
    }
    out
}

/// `row`'s throughput over its system's 1-client point in the same mode, round by round.
fn over_one_client(points: &[Point], row: &Row) -> Option<Spread> {
    let ratios: Vec<f64> = rounds_at(points, row.system, row.nodes, row.mode, row.clients)
        .filter_map(|p| {
            let one = point_of(points, p.system, p.nodes, p.mode, 1, p.round)?;
            Some(p.per_second / one.per_second.max(1e-9))
        })
        .collect();
    Spread::of(&ratios)
}

/// The verdicts as a Markdown table, led by a line saying what they judge.
pub fn table(verdicts: &[Verdict]) -> String {
    let lines = verdicts.iter().map(|v| {
        let met = if v.met { "yes" } else { "no" };
        vec![v.goal.to_owned(), v.system.to_owned(), v.mode.name().to_owned(), v.reads.text(), met.to_owned()]
    });
    "#16's goals, 3 nodes, judged on this run: each figure is the median of the rounds' own ratios (with their \
     range), and a goal is met when the median is on its side of the line.\n\n"
        .to_owned()
        + &markdown(&["goal", "system", "clients to", "reads", "met"], lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary;

    /// A 3-node point whose p50 follows from its rate, as one closed-loop client's would.
    fn point(system: &'static str, mode: Mode, clients: usize, round: u32, per_second: f64) -> Point {
        Point {
            system,
            nodes: NODES,
            mode,
            clients,
            round,
            requests: 100,
            errors: 0,
            per_second,
            p50_ms: 1_000.0 / per_second,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            cpu: None,
        }
    }

    fn verdict<'v>(verdicts: &'v [Verdict], goal: &str, system: &str, mode: Mode) -> Option<&'v Verdict> {
        verdicts.iter().find(|v| v.goal.starts_with(goal) && v.system == system && v.mode == mode)
    }

    #[test]
    fn each_goal_reads_its_figure_and_is_met_on_its_side_of_the_line() {
        let mut points = Vec::new();
        for round in 1..=3 {
            let r = f64::from(round);
            points.extend([
                point("etcd", Mode::Leader, 1, round, 1_000.0),
                Point { p50_ms: 1.2, ..point(KV[0], Mode::Leader, 1, round, 800.0) },
                point(RECONCILE[0], Mode::Leader, 1, round, 700.0),
                point("etcd", Mode::Leader, 16, round, 4_000.0),
                point(KV[0], Mode::Leader, 16, round, 8_000.0),
                point(RECONCILE[0], Mode::Leader, 16, round, 5_000.0 + r),
                point(KV[0], Mode::Follower, 16, round, 7_200.0),
                point(RECONCILE[0], Mode::Follower, 16, round, 4_000.0),
                point(KV[0], Mode::Spread, 16, round, 7_600.0),
                point("etcd", Mode::Leader, 256, round, 10_000.0),
                point(KV[0], Mode::Leader, 256, round, 8_000.0 + 1_000.0 * r),
                point(RECONCILE[0], Mode::Leader, 256, round, 8_000.0),
            ]);
        }
        let verdicts = judge(&summary::rows(&points), &points);
        let reads = |goal, system, mode| verdict(&verdicts, goal, system, mode).map(|v| (v.reads.median, v.met));

        // The median of 0.9, 1.0 and 1.1, met exactly on the line.
        let kv_256 = verdict(&verdicts, "256 clients: ops/s ≥ 1.0×", KV[0], Mode::Leader).expect("judged");
        assert_eq!((kv_256.reads.median, kv_256.reads.min, kv_256.reads.max, kv_256.met), (1.0, 0.9, 1.1, true));
        assert_eq!(reads("256 clients: ops/s ≥ 0.8×", RECONCILE[0], Mode::Leader), Some((0.8, true)));
        assert!(verdict(&verdicts, "256 clients: ops/s ≥ 1.0×", RECONCILE[0], Mode::Leader).is_none());
        // p50s: kv's 1.2× etcd's is met, on the line; reconcile's (1,000/700)× is not.
        assert_eq!(reads("1 client", KV[0], Mode::Leader), Some((1.2, true)));
        assert_eq!(reads("1 client", RECONCILE[0], Mode::Leader).map(|r| r.1), Some(false));
        // 7,200 over 8,000 through the leader; 4,000 over about 5,002.
        assert_eq!(reads("16 clients on one follower", KV[0], Mode::Follower), Some((0.9, true)));
        assert_eq!(reads("16 clients on one follower", RECONCILE[0], Mode::Follower).map(|r| r.1), Some(false));
        assert!(verdict(&verdicts, "16 clients on one follower", KV[0], Mode::Leader).is_none());
        assert!(verdict(&verdicts, "16 clients on one follower", KV[0], Mode::Spread).is_none());
        // 8,000 over 800, and about 5,002 over 700; the follower mode has no 1-client point.
        assert_eq!(reads("16 clients: ops/s ≥ 8×", KV[0], Mode::Leader), Some((10.0, true)));
        assert_eq!(reads("16 clients: ops/s ≥ 8×", RECONCILE[0], Mode::Leader).map(|r| r.1), Some(false));
        assert!(verdict(&verdicts, "16 clients: ops/s ≥ 8×", KV[0], Mode::Follower).is_none());
        assert!(verdicts.iter().all(|v| v.system != "etcd"), "etcd is the reference, not judged");
    }

    #[test]
    fn sixteen_clients_over_one_pairs_the_points_of_each_round() {
        // Round 1 is slow at both client counts, round 2 fast at both: 8× in each round, where
        // pairing across rounds would read 4× and 16×.
        let points = [
            point(KV[0], Mode::Leader, 1, 1, 500.0),
            point(KV[0], Mode::Leader, 16, 1, 4_000.0),
            point(KV[0], Mode::Leader, 1, 2, 1_000.0),
            point(KV[0], Mode::Leader, 16, 2, 8_000.0),
        ];
        let verdicts = judge(&summary::rows(&points), &points);
        let v = verdict(&verdicts, "16 clients: ops/s ≥ 8×", KV[0], Mode::Leader).expect("judged");
        assert_eq!((v.reads.min, v.reads.max, v.met), (8.0, 8.0, true));
        assert_eq!(verdicts.len(), 1, "without etcd or a follower, nothing else is judged: {verdicts:?}");
    }

    #[test]
    fn a_compared_twin_is_judged_and_a_network_of_another_size_is_not() {
        let mut points = vec![
            point("etcd", Mode::Leader, 256, 1, 1_000.0),
            point(KV[0], Mode::Leader, 256, 1, 1_200.0),
            point(KV[1], Mode::Leader, 256, 1, 900.0),
        ];
        points.extend(points.clone().into_iter().map(|p| Point { nodes: 1, ..p }));
        let verdicts = judge(&summary::rows(&points), &points);
        let met: Vec<_> = verdicts.iter().map(|v| (v.system, v.met)).collect();
        assert_eq!(met, [(KV[0], true), (KV[1], false)]);
        assert!(table(&verdicts).contains(&format!("| {} | leader | 0.90 | no |", KV[1])));
    }
}

//! `cloister bench`: drives a running node over HTTPS with the reconcile app and prints
//! throughput and latency, each set of figures against a stated baseline.
//!
//! - 1-record ingests at each concurrency in `--clients`: requests/s, p50, p99, and the scaling
//!   over the single-client run;
//! - 1,000-record batch ingests: records/s, against the records/s of 1-record ingests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::sandbox::SandboxFile;
use cloister_client::Client;
use cloister_crypto::identity::{self, KeyedCert};

#[derive(clap::Args)]
pub struct Args {
    /// A sandbox folder to take the URL, CA and party identities from.
    #[arg(long, default_value = "sandbox")]
    sandbox: PathBuf,
    /// The node's HTTPS URL, instead of the sandbox's.
    #[arg(long)]
    url: Option<String>,
    /// Concurrent clients for the 1-record runs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Seconds each run lasts.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Records per batch in the batch run (0 skips it).
    #[arg(long, default_value_t = 1000)]
    batch_records: usize,
    /// Instead of an existing sandbox, start a fresh one of each of these sizes (e.g. 1,3), run
    /// the 1-record runs on each, and print each size against the first.
    #[arg(long, value_delimiter = ',')]
    compare_nodes: Vec<usize>,
}

/// What one run measured.
pub(crate) struct RunResult {
    pub requests: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl RunResult {
    pub(crate) fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `clients` concurrent connections for `duration`, each sending bodies from `body(n)` in a
/// closed loop, and collects every latency. Any non-2xx answer fails the run.
pub(crate) async fn run_load(
    url: &str,
    ca: &[u8],
    ids: &[KeyedCert],
    clients: usize,
    duration: Duration,
    target: &'static str,
    body: impl Fn(u64) -> Vec<u8> + Send + Sync + 'static,
) -> anyhow::Result<RunResult> {
    let body = Arc::new(body);
    let counter = Arc::new(AtomicU64::new(0));
    let mut connections = Vec::with_capacity(clients);
    for i in 0..clients {
        connections.push(Client::connect(url, ca, Some(&ids[i % ids.len()])).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|client| {
            let (body, counter) = (body.clone(), counter.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let reply = client.post(target, "application/json", body(n)).await?;
                    anyhow::ensure!(
                        (200..300).contains(&reply.status),
                        "request failed: {} {}",
                        reply.status,
                        reply.text()
                    );
                    latencies.push(t.elapsed());
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(!all.is_empty(), "no request completed in {duration:?}");
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Ok(RunResult { requests: all.len(), elapsed, p50: pct(0.50), p99: pct(0.99) })
}

/// A body with one fresh record.
pub(crate) fn one_record(n: u64) -> Vec<u8> {
    format!(r#"{{"lei":"BENCH{n:015}","nace":"C.{}"}}"#, n % 97).into_bytes()
}

fn batch(records: usize) -> impl Fn(u64) -> Vec<u8> + Send + Sync + 'static {
    move |n| {
        let rows: Vec<_> = (0..records)
            .map(|i| serde_json::json!({"lei": format!("BATCH{n:08}{i:07}"), "nace": format!("C.{}", i % 97)}))
            .collect();
        serde_json::to_vec(&rows).expect("rows serialize")
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !args.compare_nodes.is_empty() {
        return compare_nodes(&args).await;
    }
    let sandbox = SandboxFile::read(&args.sandbox)?;
    let url = args.url.clone().unwrap_or_else(|| sandbox.rest_url.clone());
    let ca = sandbox.client_roots()?;
    let ids: Vec<KeyedCert> =
        sandbox.parties.iter().map(|p| identity::read_pair(&p.cert, &p.key)).collect::<anyhow::Result<_>>()?;
    let duration = Duration::from_secs(args.seconds);
    println!("benchmarking {url} for {} s per run", args.seconds);

    let mut baseline: Option<f64> = None;
    let mut single_record_rate = 0.0;
    for &clients in &args.clients {
        let r = run_load(&url, &ca, &ids, clients, duration, "/app/ingest", one_record).await?;
        let rate = r.per_second();
        let base = *baseline.get_or_insert(rate);
        single_record_rate = f64::max(single_record_rate, rate);
        println!(
            "1-record ingest, {clients:>3} clients: {rate:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({:.2}x the {}-client rate)",
            ms(r.p50),
            ms(r.p99),
            rate / base,
            args.clients[0]
        );
    }
    if args.batch_records > 0 {
        let r = run_load(&url, &ca, &ids, 4, duration, "/app/ingest", batch(args.batch_records)).await?;
        let records = r.per_second() * args.batch_records as f64;
        println!(
            "{}-record batch ingest, 4 clients: {records:>8.0} records/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({:.1}x the best 1-record rate)",
            args.batch_records,
            ms(r.p50),
            ms(r.p99),
            records / single_record_rate.max(1.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A sandbox of `nodes` nodes in a temporary folder, run as a child process.
struct TempSandbox {
    _dir: tempfile::TempDir,
    child: std::process::Child,
    file: SandboxFile,
}

impl TempSandbox {
    async fn start(nodes: usize, port: u16) -> anyhow::Result<TempSandbox> {
        let dir = tempfile::tempdir()?;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["sandbox", "--nodes", &nodes.to_string(), "--port", &port.to_string(), "--dir"])
            .arg(dir.path())
            .env("CLOISTER_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // The sandbox prints its usage once every node is ready.
        let stdout = child.stdout.take().context("sandbox stdout")?;
        let ready = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains("grpcurl"))
        });
        anyhow::ensure!(ready.await?, "the {nodes}-node sandbox exited before it was ready");
        let file = SandboxFile::read(dir.path())?;
        Ok(TempSandbox { _dir: dir, child, file })
    }
}

impl Drop for TempSandbox {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit pid_t");
        // SAFETY: kill(2) with a valid signal, on our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

async fn compare_nodes(args: &Args) -> anyhow::Result<ExitCode> {
    let duration = Duration::from_secs(args.seconds);
    let mut results: Vec<(usize, Vec<RunResult>)> = Vec::new();
    for (k, &nodes) in args.compare_nodes.iter().enumerate() {
        let port = 27000 + 100 * k as u16;
        println!("starting a {nodes}-node sandbox on ports {port}…");
        let sandbox = TempSandbox::start(nodes, port).await?;
        let ca = sandbox.file.client_roots()?;
        let ids: Vec<KeyedCert> =
            sandbox.file.parties.iter().map(|p| identity::read_pair(&p.cert, &p.key)).collect::<anyhow::Result<_>>()?;
        let mut runs = Vec::new();
        for &clients in &args.clients {
            let r = run_load(&sandbox.file.rest_url, &ca, &ids, clients, duration, "/app/ingest", one_record).await?;
            println!(
                "{nodes} node(s), {clients:>3} clients: {:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
                r.per_second(),
                ms(r.p50),
                ms(r.p99)
            );
            runs.push(r);
        }
        results.push((nodes, runs));
    }
    let (base_nodes, base) = &results[0];
    for (nodes, runs) in &results[1..] {
        for ((clients, r), b) in args.clients.iter().zip(runs).zip(base) {
            println!(
                "{clients:>3} clients: {nodes} nodes keep {:.0}% of {base_nodes}-node throughput ({:.0} vs {:.0} req/s)",
                100.0 * r.per_second() / b.per_second(),
                r.per_second(),
                b.per_second()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

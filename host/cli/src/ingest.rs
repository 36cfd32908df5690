//! `cloister ingest`: streams a large CSV or JSON file into an app's ingest endpoint in batches
//! within the app's limits, with progress, retries that never ingest a batch twice when the
//! service can say whether it committed, and a progress file to resume from.
//!
//! A reader thread parses the file and cuts it into batches (records and bytes bounded); the
//! uploader sends one batch at a time, in order, and records each committed batch in the
//! progress file before the next. The progress file holds how many records and bytes of the
//! file are in, and a blake3 digest of those bytes, so `--resume` continues only the same file.

use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::call::{Resolved, Target};
use cloister_client::{Client, Reply};

/// Records per batch unless `--batch-records` says otherwise: half the reconcile app's default
/// `batch_records_max` (10,000), so one batch is a fraction of a second of the writer's time.
pub const BATCH_RECORDS_DEFAULT: u64 = 5_000;
/// Bytes per batch at most unless `--batch-bytes` says otherwise: half the node's default
/// `body_bytes_max` (8 MiB). A single record larger than this still goes, alone.
pub const BATCH_BYTES_DEFAULT: u64 = 4 << 20;
/// How long one batch is retried (unreachable nodes, no leader, unknown outcomes) before the
/// run stops, unless `--retry-for-s` says otherwise.
pub const RETRY_FOR_S_DEFAULT: u64 = 120;
/// How long one request may take before it counts as unanswered.
pub const REQUEST_TIMEOUT_S_DEFAULT: u64 = 60;
/// Batches parsed ahead of the one being sent.
const BATCHES_AHEAD: usize = 2;
/// The first wait between retries; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a progress line is printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Invalid rows printed from a refusal (the app lists at most 20).
const ROWS_SHOWN_MAX: usize = 20;

#[derive(clap::Args)]
pub struct Args {
    /// The file to ingest.
    file: PathBuf,
    /// The file is CSV with a header line (sent to POST /app/csv/ingest).
    #[arg(long, conflicts_with = "json", required_unless_present = "json")]
    csv: bool,
    /// The file is JSON: an array of record objects, or one object per line (sent to POST /app/ingest).
    #[arg(long)]
    json: bool,
    /// Records per batch, at most the app's batch_records_max.
    #[arg(long, default_value_t = BATCH_RECORDS_DEFAULT, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch_records: u64,
    /// Bytes per batch at most; a batch is cut early to stay under it.
    #[arg(long, default_value_t = BATCH_BYTES_DEFAULT, value_parser = clap::value_parser!(u64).range(1024..=(1 << 30)))]
    batch_bytes: u64,
    /// Continue an interrupted run from its progress file.
    #[arg(long)]
    resume: bool,
    /// The progress file (default: FILE.ingest-progress.json beside the file).
    #[arg(long)]
    progress_file: Option<PathBuf>,
    /// Another node of the same service, tried when the others cannot be reached (repeatable;
    /// a sandbox's nodes are all tried anyway).
    #[arg(long = "also-url")]
    also_urls: Vec<String>,
    /// How long to keep retrying one batch before stopping, in seconds.
    #[arg(long, default_value_t = RETRY_FOR_S_DEFAULT)]
    retry_for_s: u64,
    /// How long one request may take before it counts as unanswered, in seconds.
    #[arg(long, default_value_t = REQUEST_TIMEOUT_S_DEFAULT, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_s: u64,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Format {
    Csv,
    Json,
}

impl Format {
    fn endpoint(self) -> (&'static str, &'static str) {
        match self {
            Format::Csv => ("/app/csv/ingest", "text/csv"),
            Format::Json => ("/app/ingest", "application/json"),
        }
    }
}

/// What the progress file records: the records and bytes of the file that are in.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Progress {
    format: Option<Format>,
    /// Records committed, from the file's start.
    records: u64,
    /// Bytes of the file those records span.
    bytes: u64,
    /// blake3 of those bytes, hex.
    prefix_blake3: String,
    /// The whole file is in.
    complete: bool,
    /// Whose records they are: the caller's id (absent in a file from before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    caller: Option<String>,
    /// Where they went: the service's id (its identity certificate's digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<String>,
}

/// Whose records a run sends, and to which service: what a progress file must match to be
/// resumed, since the app counts each party's records apart and a new service holds none.
struct Destination {
    caller: Option<String>,
    /// The service's id.
    service: String,
    /// The ids of the services it was recovered from: a recovery keeps only what a signature
    /// covered, so records that went to them may be gone.
    recovered_from: Vec<String>,
}

impl Destination {
    /// Asks the nodes, each in turn until one answers, which service they serve.
    async fn of(nodes: &mut Nodes, caller: Option<String>) -> anyhow::Result<Destination> {
        let mut failed = None;
        for _ in 0..nodes.urls().len() {
            let record = match nodes.client().await {
                Ok(client) => client.service_record().await,
                Err(e) => Err(e),
            };
            match record {
                Ok(record) => {
                    let previous = record["previous_identities"].as_array().into_iter().flatten();
                    let recovered_from = previous
                        .map(|p| {
                            let pem = p["cert"].as_str().context("a previous identity without its certificate")?;
                            cloister_crypto::identity::id_of_pem(pem.as_bytes())
                        })
                        .collect::<anyhow::Result<_>>()?;
                    let service = cloister_client::service_id_of(&record)?;
                    return Ok(Destination { caller, service, recovered_from });
                }
                Err(e) => {
                    failed = Some(e.context(format!("reading /gov/service from {}", nodes.url())));
                    nodes.next();
                }
            }
        }
        Err(failed.unwrap_or_else(|| anyhow::anyhow!("no node to ask")))
    }
}

/// One batch, ready to send.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Records before this batch in the file.
    pub first_record: u64,
    pub records: u64,
    body: Vec<u8>,
    /// The byte offset in the file just after this batch's last record.
    pub end: u64,
    /// For CSV: the batch body's line where each record starts, and the file's.
    lines: Option<(Vec<u64>, Vec<u64>)>,
}

impl Batch {
    /// Where a row the app named (a body line for CSV, a 1-based record for JSON) is in the file.
    /// A line before the batch's first record (the header the batch repeats, or a row no app
    /// should name) is the file's line of that number: the batch's header is the file's.
    fn file_row(&self, row: u64) -> String {
        match &self.lines {
            Some((body_lines, file_lines)) => {
                let i = body_lines.partition_point(|&l| l <= row).saturating_sub(1);
                let line = file_lines.get(i).zip(body_lines.get(i)).and_then(|(l, b)| Some(l + row.checked_sub(*b)?));
                format!("line {}", line.unwrap_or(row))
            }
            None => format!("record {}", self.first_record + row),
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let format = if args.csv { Format::Csv } else { Format::Json };
    let progress_path = args.progress_file.clone().unwrap_or_else(|| {
        let mut name = args.file.file_name().unwrap_or_default().to_os_string();
        name.push(".ingest-progress.json");
        args.file.with_file_name(name)
    });
    let file_len = std::fs::metadata(&args.file).with_context(|| format!("reading {}", args.file.display()))?.len();
    let Resolved { mut urls, ca, id } = args.target.resolve()?;
    for url in &args.also_urls {
        if !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    let caller = id.as_ref().map(|id| id.id()).transpose()?;
    let mut nodes = Nodes::new(urls, ca, id);
    let destination = Destination::of(&mut nodes, caller).await?;
    let start = start_from(&args, &progress_path, format, &destination)?;
    if start.complete {
        eprintln!("{}: already ingested completely ({} records); nothing to do", args.file.display(), start.records);
        return Ok(ExitCode::SUCCESS);
    }
    let limits = Limits {
        records: args.batch_records,
        bytes: args.batch_bytes as usize,
        retry_for: Duration::from_secs(args.retry_for_s),
        request_timeout: Duration::from_secs(args.request_timeout_s),
    };
    let mut saver = Saver::new(&args.file, &progress_path, format, &start, &destination)?;
    let mut shown = Shown::new(file_len, start.bytes);
    let started = Instant::now();
    let mut stats = Stats::default();
    let refusal = upload(&mut nodes, &args.file, format, &limits, start.records, &mut stats, |batch, stats| {
        saver.committed(batch)?;
        shown.update(saver.progress.records, batch.end, started, stats.records);
        Ok(())
    })
    .await?;
    shown.finish();
    if let Some(refusal) = refusal {
        eprint!("{}", refusal.describe());
        eprintln!(
            "{} records before this batch are in; after fixing the file's later rows, continue with --resume \
             (progress: {})",
            refusal.first_record,
            progress_path.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    saver.complete()?;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "ingested {} records in {} batches in {elapsed:.1} s ({:.0} records/s){}{}; {} records in all",
        stats.records,
        stats.batches,
        stats.records as f64 / elapsed.max(1e-9),
        if stats.retries > 0 { format!(", {} retries", stats.retries) } else { String::new() },
        if start.records > 0 { format!(", resumed after {} records", start.records) } else { String::new() },
        saver.progress.records,
    );
    Ok(ExitCode::SUCCESS)
}

/// Sends `file` from record `skip` on, one batch at a time and in order; `committed` hears of
/// each batch once it is in. Stops at the first batch the app refuses, and returns why.
pub(crate) async fn upload(
    nodes: &mut Nodes,
    file: &Path,
    format: Format,
    limits: &Limits,
    skip: u64,
    stats: &mut Stats,
    mut committed: impl FnMut(&Batch, &Stats) -> anyhow::Result<()>,
) -> anyhow::Result<Option<Refusal>> {
    let (batches_tx, mut batches) = tokio::sync::mpsc::channel(BATCHES_AHEAD);
    let (path, batch_limits) = (file.to_owned(), (limits.records, limits.bytes));
    let reader = tokio::task::spawn_blocking(move || {
        let send = |b: anyhow::Result<Batch>| batches_tx.blocking_send(b).is_ok();
        if let Err(e) = read_batches(&path, format, skip, batch_limits, &send) {
            send(Err(e));
        }
    });
    let (target, content_type) = format.endpoint();
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        match send_batch(nodes, limits, target, content_type, &batch, stats).await? {
            Sent::Committed => {
                stats.records += batch.records;
                stats.batches += 1;
                committed(&batch, stats)?;
            }
            Sent::Refused(reply) => return Ok(Some(Refusal::of(&batch, &reply))),
        }
    }
    reader.await.context("the file reader stopped")?;
    Ok(None)
}

/// The progress to start from: none, or (with `--resume`) the progress file's, once the file's
/// prefix is checked to be the one it describes, and its records to have gone from this caller
/// to this service.
fn start_from(args: &Args, progress_path: &Path, format: Format, to: &Destination) -> anyhow::Result<Progress> {
    let saved = match std::fs::read(progress_path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<Progress>(&bytes)
                .with_context(|| format!("{} is not an ingest progress file", progress_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", progress_path.display())),
    };
    match (saved, args.resume) {
        (None, false) => Ok(Progress { format: Some(format), ..Progress::default() }),
        (None, true) => anyhow::bail!("--resume: there is no progress file {}", progress_path.display()),
        (Some(p), false) => anyhow::bail!(
            "an earlier run left {} ({} records in{}); pass --resume to continue it, or delete it to start over",
            progress_path.display(),
            p.records,
            if p.complete { ", complete" } else { "" }
        ),
        (Some(p), true) => {
            anyhow::ensure!(
                p.format == Some(format),
                "{} is the progress of a {:?} ingest, not of this one",
                progress_path.display(),
                p.format
            );
            if let Some(caller) = &p.caller {
                anyhow::ensure!(
                    Some(caller) == to.caller.as_ref(),
                    "{} is the progress of caller {caller}'s ingest, not of {}'s: those records are not yours",
                    progress_path.display(),
                    to.caller.as_deref().unwrap_or("an anonymous caller")
                );
            }
            match &p.service {
                Some(service) if *service == to.service => {}
                Some(service) if to.recovered_from.contains(service) => anyhow::bail!(
                    "{} is the progress of an ingest into service {service}, from which this one ({}) was \
                     recovered: a recovery keeps only what a signature covered, so some of those records may \
                     be gone; start over without it (the app counts each row once)",
                    progress_path.display(),
                    to.service
                ),
                Some(service) => anyhow::bail!(
                    "{} is the progress of an ingest into service {service}, not into this one ({}): start over \
                     without it",
                    progress_path.display(),
                    to.service
                ),
                None => {}
            }
            if p.caller.is_none() || p.service.is_none() {
                eprintln!(
                    "note: {} was written by an older version and names no caller or service: nothing checks \
                     that its records went from you to this service",
                    progress_path.display()
                );
            }
            let digest = prefix_digest(&args.file, p.bytes)?;
            anyhow::ensure!(
                digest.to_hex().as_str() == p.prefix_blake3,
                "{} changed in its first {} bytes (what {} says is in); it cannot be resumed",
                args.file.display(),
                p.bytes,
                progress_path.display()
            );
            Ok(p)
        }
    }
}

/// blake3 of a file's first `len` bytes.
fn prefix_digest(path: &Path, len: u64) -> anyhow::Result<blake3::Hash> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let copied = std::io::copy(&mut file.take(len), &mut hasher)?;
    anyhow::ensure!(copied == len, "{} is shorter than the {len} bytes already ingested", path.display());
    Ok(hasher.finalize())
}

/// Keeps the progress file in step with committed batches, hashing the file's bytes as they
/// are committed (one sequential pass in all).
struct Saver {
    path: PathBuf,
    progress: Progress,
    hasher: blake3::Hasher,
    source: BufReader<std::fs::File>,
}

impl Saver {
    fn new(file: &Path, path: &Path, format: Format, start: &Progress, to: &Destination) -> anyhow::Result<Saver> {
        let mut source =
            BufReader::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?);
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut (&mut source).take(start.bytes), &mut hasher)?;
        let progress = Progress {
            format: Some(format),
            caller: to.caller.clone(),
            service: Some(to.service.clone()),
            ..start.clone()
        };
        Ok(Saver { path: path.to_owned(), progress, hasher, source })
    }

    fn committed(&mut self, batch: &Batch) -> anyhow::Result<()> {
        let more = batch.end - self.progress.bytes;
        let copied = std::io::copy(&mut (&mut self.source).take(more), &mut self.hasher)?;
        anyhow::ensure!(copied == more, "the file shrank while it was being ingested");
        self.progress.records = batch.first_record + batch.records;
        self.progress.bytes = batch.end;
        self.progress.prefix_blake3 = self.hasher.finalize().to_hex().to_string();
        self.save()
    }

    fn complete(&mut self) -> anyhow::Result<()> {
        self.progress.complete = true;
        self.save()
    }

    /// Writes the progress file whole or not at all (a temporary file renamed over it).
    fn save(&self) -> anyhow::Result<()> {
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("writing progress beside {}", self.path.display()))?;
        tmp.write_all(&serde_json::to_vec_pretty(&self.progress)?)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

/// Counts bytes read through it, so a parser's position in the file is known.
struct Counting<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Parses the file and hands out batches, after skipping `skip` records. Returns early (Ok)
/// if nobody takes batches any more.
fn read_batches(
    path: &Path,
    format: Format,
    skip: u64,
    (records_max, bytes_max): (u64, usize),
    send: &dyn Fn(anyhow::Result<Batch>) -> bool,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    match format {
        Format::Csv => read_csv(file, skip, (records_max, bytes_max), send),
        Format::Json => read_json(file, skip, (records_max, bytes_max), send),
    }
}

fn read_csv(
    file: std::fs::File,
    skip: u64,
    (records_max, bytes_max): (u64, usize),
    send: &dyn Fn(anyhow::Result<Batch>) -> bool,
) -> anyhow::Result<()> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).has_headers(false).from_reader(BufReader::new(file));
    let mut header = csv::ByteRecord::new();
    anyhow::ensure!(reader.read_byte_record(&mut header)?, "the CSV file is empty: it has no header line");
    let header_bytes = csv_line(&header)?;
    let mut record = csv::ByteRecord::new();
    let mut seen = 0u64;
    let mut batch = CsvBatch::new(&header_bytes, skip);
    loop {
        let line = reader.position().line();
        let more = reader.read_byte_record(&mut record).with_context(|| format!("reading CSV line {line}"))?;
        if !more {
            break;
        }
        seen += 1;
        if seen <= skip {
            continue;
        }
        let row = csv_line(&record)?;
        if batch.records > 0 && (batch.records >= records_max || batch.body.len() + row.len() > bytes_max) {
            let next = CsvBatch::new(&header_bytes, seen - 1);
            if !send(Ok(std::mem::replace(&mut batch, next).finish())) {
                return Ok(());
            }
        }
        batch.push(&row, line, reader.position().byte());
    }
    if batch.records > 0 {
        send(Ok(batch.finish()));
    }
    Ok(())
}

/// One record written back as CSV: fields quoted where needed, ending in a newline.
fn csv_line(record: &csv::ByteRecord) -> anyhow::Result<Vec<u8>> {
    let mut writer = csv::WriterBuilder::new().flexible(true).from_writer(Vec::new());
    writer.write_byte_record(record)?;
    writer.into_inner().map_err(|e| anyhow::anyhow!("writing a CSV row: {e}"))
}

struct CsvBatch {
    first_record: u64,
    records: u64,
    body: Vec<u8>,
    body_line: u64,
    body_lines: Vec<u64>,
    file_lines: Vec<u64>,
    end: u64,
}

impl CsvBatch {
    fn new(header: &[u8], first_record: u64) -> CsvBatch {
        CsvBatch {
            first_record,
            records: 0,
            body: header.to_vec(),
            body_line: 1 + newlines(header),
            body_lines: Vec::new(),
            file_lines: Vec::new(),
            end: 0,
        }
    }

    fn push(&mut self, row: &[u8], file_line: u64, end: u64) {
        self.body_lines.push(self.body_line);
        self.file_lines.push(file_line);
        self.body_line += newlines(row);
        self.body.extend_from_slice(row);
        self.records += 1;
        self.end = end;
    }

    fn finish(self) -> Batch {
        Batch {
            first_record: self.first_record,
            records: self.records,
            body: self.body,
            end: self.end,
            lines: Some((self.body_lines, self.file_lines)),
        }
    }
}

fn newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// A JSON file: a top-level array of records (streamed element by element), or a sequence of
/// values (one object per line, or concatenated).
fn read_json(
    file: std::fs::File,
    skip: u64,
    (records_max, bytes_max): (u64, usize),
    send: &dyn Fn(anyhow::Result<Batch>) -> bool,
) -> anyhow::Result<()> {
    let mut input = BufReader::new(file);
    let first = loop {
        let buf = input.fill_buf()?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                input.consume(i);
                break Some(b);
            }
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    };
    let offset = input.stream_position()?;
    let mut batcher =
        JsonBatcher { skip, records_max, bytes_max, send, seen: 0, first: 0, rows: Vec::new(), bytes: 2, end: 0 };
    match first {
        None => anyhow::bail!("the JSON file is empty"),
        Some(b'[') => {
            // serde_json reads a `Read` byte by byte, so the count after an element is where it ends.
            let count = std::rc::Rc::new(std::cell::Cell::new(offset));
            let counting = Counting { inner: input, count: count.clone() };
            let mut de = serde_json::Deserializer::from_reader(counting);
            let visitor = ArrayVisitor { batcher: &mut batcher, count };
            match serde::Deserializer::deserialize_seq(&mut de, visitor) {
                Ok(true) => de.end().map_err(|e| anyhow::anyhow!("after the JSON array: {e}"))?,
                Ok(false) => return Ok(()),
                Err(e) => anyhow::bail!("reading the JSON array: {e}"),
            }
        }
        Some(_) => {
            let mut stream = serde_json::Deserializer::from_reader(input).into_iter::<Value>();
            while let Some(value) = stream.next() {
                let value = value.map_err(|e| anyhow::anyhow!("reading JSON record {}: {e}", batcher.seen + 1))?;
                let end = offset + stream.byte_offset() as u64;
                if !batcher.push(value, end)? {
                    return Ok(());
                }
            }
        }
    }
    batcher.flush();
    Ok(())
}

struct JsonBatcher<'a> {
    skip: u64,
    records_max: u64,
    bytes_max: usize,
    send: &'a dyn Fn(anyhow::Result<Batch>) -> bool,
    /// Records read so far, skipped ones included.
    seen: u64,
    /// Records before the batch being gathered.
    first: u64,
    rows: Vec<Vec<u8>>,
    /// The batch body's size so far: brackets and commas included.
    bytes: usize,
    end: u64,
}

impl JsonBatcher<'_> {
    /// Adds a record ending at byte `end`; false once nobody takes batches.
    fn push(&mut self, value: Value, end: u64) -> anyhow::Result<bool> {
        self.seen += 1;
        if self.seen <= self.skip {
            return Ok(true);
        }
        let row = serde_json::to_vec(&value)?;
        let full = self.rows.len() as u64 >= self.records_max || self.bytes + row.len() + 1 > self.bytes_max;
        if !self.rows.is_empty() && full && !self.flush() {
            return Ok(false);
        }
        if self.rows.is_empty() {
            self.first = self.seen - 1;
        }
        self.bytes += row.len() + 1;
        self.rows.push(row);
        self.end = end;
        Ok(true)
    }

    /// Sends the batch gathered so far, if any; false once nobody takes batches.
    fn flush(&mut self) -> bool {
        if self.rows.is_empty() {
            return true;
        }
        let rows = std::mem::take(&mut self.rows);
        let mut body = Vec::with_capacity(self.bytes);
        body.push(b'[');
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(row);
        }
        body.push(b']');
        self.bytes = 2;
        let batch = Batch { first_record: self.first, records: rows.len() as u64, body, end: self.end, lines: None };
        (self.send)(Ok(batch))
    }
}

/// Feeds a top-level array's elements to the batcher as they are parsed; answers false if the
/// batches stopped being taken.
struct ArrayVisitor<'a, 'b> {
    batcher: &'a mut JsonBatcher<'b>,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<'de> serde::de::Visitor<'de> for ArrayVisitor<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        use serde::de::Error;
        while let Some(value) = seq.next_element::<Value>()? {
            let record = self.batcher.seen + 1;
            match self.batcher.push(value, self.count.get()) {
                Ok(true) => {}
                Ok(false) => return Ok(false),
                Err(e) => return Err(A::Error::custom(format!("record {record}: {e}"))),
            }
        }
        Ok(true)
    }
}

/// The service's nodes, and a connection to the one in use.
pub(crate) struct Nodes {
    urls: Vec<String>,
    ca: Vec<u8>,
    id: Option<cloister_crypto::identity::KeyedCert>,
    current: usize,
    client: Option<Client>,
}

impl Nodes {
    pub fn new(urls: Vec<String>, ca: Vec<u8>, id: Option<cloister_crypto::identity::KeyedCert>) -> Nodes {
        Nodes { urls, ca, id, current: 0, client: None }
    }

    /// A connection to a node, made if there is none (to the node in turn).
    pub async fn client(&mut self) -> anyhow::Result<Client> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let url = &self.urls[self.current];
        let client = Client::connect(url, &self.ca, self.id.as_ref()).await?;
        self.client = Some(client.clone());
        Ok(client)
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Drops the connection in use and moves to the next node.
    pub fn next(&mut self) {
        self.client = None;
        self.current = (self.current + 1) % self.urls.len();
    }

    fn url(&self) -> &str {
        &self.urls[self.current]
    }
}

/// How batches are cut and how long they are retried.
pub(crate) struct Limits {
    pub records: u64,
    pub bytes: usize,
    pub retry_for: Duration,
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            records: BATCH_RECORDS_DEFAULT,
            bytes: BATCH_BYTES_DEFAULT as usize,
            retry_for: Duration::from_secs(RETRY_FOR_S_DEFAULT),
            request_timeout: Duration::from_secs(REQUEST_TIMEOUT_S_DEFAULT),
        }
    }
}

/// What a run has done so far.
#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub records: u64,
    pub batches: u64,
    pub retries: u64,
}

enum Sent {
    Committed,
    Refused(Box<Reply>),
}

/// Sends one batch until it is known to be committed or refused, or `retry_for` passes.
///
/// A batch whose answer is lost (a node dies, a request times out, leadership changes) is sent
/// again only once it is known not to have committed: a `TransactionOutcomeUnknown` answer names
/// the transaction, and `/node/tx` says whether it committed. When no id is known (no answer
/// came at all), the batch is sent again; the reconcile app records one vote per party and key,
/// so a batch applied twice still counts each row once.
async fn send_batch(
    nodes: &mut Nodes,
    limits: &Limits,
    target: &str,
    content_type: &str,
    batch: &Batch,
    stats: &mut Stats,
) -> anyhow::Result<Sent> {
    let deadline = Instant::now() + limits.retry_for;
    let mut backoff = BACKOFF_START;
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            stats.retries += 1;
            anyhow::ensure!(
                Instant::now() < deadline,
                "records {}..{} could not be ingested within {} s (--retry-for-s); nothing after record {} was sent. \
                 Resume with --resume once the service is reachable",
                batch.first_record + 1,
                batch.first_record + batch.records,
                limits.retry_for.as_secs(),
                batch.first_record
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        attempt += 1;
        let client = match nodes.client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(node = nodes.url(), error = %format!("{e:#}"), "cannot reach the node; trying the next");
                nodes.next();
                continue;
            }
        };
        let sent = tokio::time::timeout(
            limits.request_timeout,
            client.request("POST", target, Some(content_type), batch.body.clone()),
        )
        .await;
        let reply = match sent {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                tracing::debug!(node = nodes.url(), error = %format!("{e:#}"), "the batch got no answer; trying the next node");
                nodes.next();
                continue;
            }
            Err(_) => {
                tracing::debug!(node = nodes.url(), "the batch got no answer in time; trying the next node");
                nodes.next();
                continue;
            }
        };
        match reply.status {
            200..=299 => return Ok(Sent::Committed),
            503 if is_outcome_unknown(&reply) => match outcome_tx(&reply) {
                Some(tx) => match settle(nodes, limits, &tx, deadline).await? {
                    true => return Ok(Sent::Committed),
                    false => continue,
                },
                None => continue,
            },
            // Nothing committed: no leader, queues full, the service not open yet.
            429 | 502 | 503 | 504 => continue,
            _ => return Ok(Sent::Refused(Box::new(reply))),
        }
    }
}

/// The transaction a `TransactionOutcomeUnknown` answer names, if any.
fn outcome_tx(reply: &Reply) -> Option<String> {
    reply.tx_id().or_else(|| reply.json().ok()?["error"]["details"]["tx_id"].as_str().map(str::to_owned))
}

fn is_outcome_unknown(reply: &Reply) -> bool {
    reply.json().is_ok_and(|body| body["error"]["code"] == "TransactionOutcomeUnknown")
}

/// Asks the service until it knows whether `tx` committed: true if it did, false if it never will.
async fn settle(nodes: &mut Nodes, limits: &Limits, tx: &str, deadline: Instant) -> anyhow::Result<bool> {
    let mut backoff = BACKOFF_START;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "whether transaction {tx} committed is still unknown after {} s (--retry-for-s); \
             GET /node/tx?id={tx} will tell, then resume with --resume",
            limits.retry_for.as_secs()
        );
        let asked = match nodes.client().await {
            Ok(client) => tokio::time::timeout(limits.request_timeout, client.get(&format!("/node/tx?id={tx}"))).await,
            Err(_) => {
                nodes.next();
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        match asked {
            Ok(Ok(reply)) if reply.status == 200 => match reply.json()?["status"].as_str() {
                Some("Committed") => return Ok(true),
                Some("Invalid") => return Ok(false),
                _ => {}
            },
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => nodes.next(),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A batch the app refused: which records, why, and the invalid rows named in the file.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    /// Records before the refused batch: all of them are in.
    pub first_record: u64,
    pub records: u64,
    pub status: u16,
    pub code: String,
    pub message: String,
    /// Each listed invalid row: where it is in the file (`line N` or `record N`) and why.
    pub rows: Vec<(String, String)>,
    /// How many rows of the batch were invalid, when the app says.
    pub invalid_rows: Option<u64>,
}

impl Refusal {
    fn of(batch: &Batch, reply: &Reply) -> Refusal {
        let body = reply.json().unwrap_or(Value::Null);
        let error = &body["error"];
        let rows = error["details"]["rows"].as_array().cloned().unwrap_or_default();
        Refusal {
            first_record: batch.first_record,
            records: batch.records,
            status: reply.status,
            code: error["code"].as_str().unwrap_or_default().to_owned(),
            message: error["message"].as_str().map(str::to_owned).unwrap_or_else(|| reply.text()),
            rows: rows
                .iter()
                .take(ROWS_SHOWN_MAX)
                .filter_map(|row| Some((batch.file_row(row["row"].as_u64()?), row["reason"].as_str()?.to_owned())))
                .collect(),
            invalid_rows: error["details"]["invalid_rows"].as_u64(),
        }
    }

    /// The refusal as lines for a person.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "error: records {}..{} were refused ({} {}): {}\n",
            self.first_record + 1,
            self.first_record + self.records,
            self.status,
            self.code,
            self.message
        );
        for (row, reason) in &self.rows {
            out.push_str(&format!("  {row}: {reason}\n"));
        }
        if let Some(total) = self.invalid_rows.filter(|&t| t as usize > self.rows.len()) {
            out.push_str(&format!("  … {total} invalid rows in this batch in all\n"));
        }
        out
    }
}

/// Progress for a person: a bar on a terminal, a line every few seconds otherwise.
struct Shown {
    bar: Option<indicatif::ProgressBar>,
    total_bytes: u64,
    last_line: Instant,
}

impl Shown {
    fn new(total_bytes: u64, done_bytes: u64) -> Shown {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new(total_bytes);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {msg} [{elapsed_precise}, ETA {eta}]")
                    .expect("the template is valid"),
            );
            bar.set_position(done_bytes);
            bar
        });
        Shown { bar, total_bytes, last_line: Instant::now() }
    }

    fn update(&mut self, records: u64, bytes: u64, started: Instant, sent: u64) {
        let rate = sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            Some(bar) => {
                bar.set_position(bytes);
                bar.set_message(format!("{records} records, {rate:.0}/s"));
            }
            None if self.last_line.elapsed() >= PLAIN_PROGRESS_EVERY || bytes == self.total_bytes => {
                self.last_line = Instant::now();
                let share = 100.0 * bytes as f64 / self.total_bytes.max(1) as f64;
                // A file that grew while it was read passes its length at the start.
                let eta = self.total_bytes.saturating_sub(bytes) as f64
                    / (bytes as f64 / started.elapsed().as_secs_f64().max(1e-9)).max(1.0);
                eprintln!("{records} records in ({share:.1}% of the file), {rate:.0} records/s, ETA {eta:.0} s");
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batches a file is cut into.
    fn batches(text: &str, format: Format, skip: u64, records: u64, bytes: usize) -> anyhow::Result<Vec<Batch>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input");
        std::fs::write(&path, text).unwrap();
        let got = std::sync::Mutex::new(Vec::new());
        read_batches(&path, format, skip, (records, bytes), &|b| {
            got.lock().unwrap().push(b.expect("the reader returns its errors"));
            true
        })?;
        Ok(got.into_inner().unwrap())
    }

    #[test]
    fn csv_batches_repeat_the_header_and_name_rows_by_file_line() {
        let text = "lei,nace\nA,1\nB,2\n\"C\nD\",3\nE,4\nF,5\n";
        let b = batches(text, Format::Csv, 0, 2, BATCH_BYTES_DEFAULT as usize).unwrap();
        assert_eq!(b.iter().map(|b| (b.first_record, b.records)).collect::<Vec<_>>(), [(0, 2), (2, 2), (4, 1)]);
        assert_eq!(String::from_utf8_lossy(&b[1].body), "lei,nace\n\"C\nD\",3\nE,4\n");
        // The app counts body lines from the header (1): E is body line 4, file line 6.
        assert_eq!(b[1].file_row(4), "line 6");
        assert_eq!(b[1].file_row(2), "line 4");
        assert_eq!(b[2].file_row(2), "line 7");
        // A row before the first record (the app named the header, or line 0): no underflow.
        assert_eq!(b[1].file_row(1), "line 1");
        assert_eq!(b[1].file_row(0), "line 0");
        assert_eq!(b[2].end, text.len() as u64);
        assert_eq!(&text[..b[0].end as usize], "lei,nace\nA,1\nB,2\n");
    }

    /// A progress file resumes only for the caller whose records it counts and the service that
    /// holds them (not one recovered from it, which may have lost some); one from before either
    /// was recorded resumes, with a note.
    #[test]
    fn a_progress_file_resumes_only_its_callers_ingest_into_its_service() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: Args,
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.csv");
        std::fs::write(&file, "lei,nace\nA,1\n").unwrap();
        let progress_path = dir.path().join("progress.json");
        let args = <Command as clap::Parser>::parse_from(["ingest", file.to_str().unwrap(), "--csv", "--resume"]).args;
        let to = |caller: &str, services: &[&str]| Destination {
            caller: Some(caller.to_owned()),
            service: services[0].to_owned(),
            recovered_from: services[1..].iter().map(|s| s.to_string()).collect(),
        };
        let saved = |caller: Option<&str>, service: Option<&str>| {
            let progress = Progress {
                format: Some(Format::Csv),
                records: 1,
                bytes: 13,
                prefix_blake3: prefix_digest(&file, 13).unwrap().to_hex().to_string(),
                complete: true,
                caller: caller.map(str::to_owned),
                service: service.map(str::to_owned),
            };
            std::fs::write(&progress_path, serde_json::to_vec(&progress).unwrap()).unwrap();
        };
        let resumed = |to: &Destination| start_from(&args, &progress_path, Format::Csv, to).map(|p| p.records);

        saved(Some("alice"), Some("s1"));
        assert_eq!(resumed(&to("alice", &["s1"])).unwrap(), 1);
        let e = resumed(&to("alice", &["s2", "s1"])).unwrap_err().to_string();
        assert!(e.contains("from which this one (s2) was"), "a recovery may have lost some: {e}");
        let e = resumed(&to("bob", &["s1"])).unwrap_err().to_string();
        assert!(e.contains("not yours"), "{e}");
        let e = resumed(&to("alice", &["s2"])).unwrap_err().to_string();
        assert!(e.contains("not into this one (s2)"), "{e}");
        saved(None, None);
        assert_eq!(resumed(&to("bob", &["s2"])).unwrap(), 1);
    }

    #[test]
    fn csv_resumes_after_the_records_already_in() {
        let text = "lei,nace\nA,1\nB,2\nC,3\n";
        let b = batches(text, Format::Csv, 2, 10, BATCH_BYTES_DEFAULT as usize).unwrap();
        assert_eq!((b.len(), b[0].first_record, b[0].records), (1, 2, 1));
        assert_eq!(String::from_utf8_lossy(&b[0].body), "lei,nace\nC,3\n");
        assert_eq!(b[0].file_row(2), "line 4");
    }

    #[test]
    fn a_batch_is_cut_before_it_passes_the_byte_limit_but_holds_at_least_one_record() {
        let text = format!("lei,nace\n{},1\nB,2\n", "A".repeat(100));
        let b = batches(&text, Format::Csv, 0, 10, 50).unwrap();
        assert_eq!(b.iter().map(|b| b.records).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn a_json_array_is_streamed_and_its_record_ends_are_byte_offsets() {
        let text = " [ {\"lei\":\"A\"} ,\n {\"lei\":\"B\"}, {\"lei\":\"C\"} ]\n";
        let b = batches(text, Format::Json, 0, 2, BATCH_BYTES_DEFAULT as usize).unwrap();
        assert_eq!(b.iter().map(|b| (b.first_record, b.records)).collect::<Vec<_>>(), [(0, 2), (2, 1)]);
        assert_eq!(String::from_utf8_lossy(&b[0].body), r#"[{"lei":"A"},{"lei":"B"}]"#);
        assert!(text[..b[0].end as usize].ends_with("{\"lei\":\"B\"}"), "{}", &text[..b[0].end as usize]);
        assert_eq!(b[1].file_row(1), "record 3");
        let resumed = batches(text, Format::Json, 2, 2, BATCH_BYTES_DEFAULT as usize).unwrap();
        assert_eq!(String::from_utf8_lossy(&resumed[0].body), r#"[{"lei":"C"}]"#);
    }

    #[test]
    fn json_lines_are_records_too() {
        let text = "{\"lei\":\"A\"}\n{\"lei\":\"B\"}\n{\"lei\":\"C\"}\n";
        let b = batches(text, Format::Json, 1, 10, BATCH_BYTES_DEFAULT as usize).unwrap();
        assert_eq!((b[0].first_record, b[0].records), (1, 2));
        assert_eq!(String::from_utf8_lossy(&b[0].body), r#"[{"lei":"B"},{"lei":"C"}]"#);
        assert_eq!(b[0].end, (text.len() - 1) as u64);
    }

    #[test]
    fn broken_files_are_named_errors() {
        let big = BATCH_BYTES_DEFAULT as usize;
        assert!(batches("", Format::Csv, 0, 10, big).unwrap_err().to_string().contains("no header"));
        assert!(batches("  \n", Format::Json, 0, 10, big).unwrap_err().to_string().contains("empty"));
        let e = batches("[{\"lei\":\"A\"}, {\"lei\": ]", Format::Json, 0, 10, big).unwrap_err();
        assert!(e.to_string().contains("reading the JSON array"), "{e}");
        let e = batches("{\"lei\":\"A\"}\n{oops", Format::Json, 0, 10, big).unwrap_err();
        assert!(e.to_string().contains("JSON record 2"), "{e}");
    }
}

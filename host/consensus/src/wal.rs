//! The Raft log's files: a write-ahead log of checksummed records in append-only segments.
//!
//! A segment is a file `<number>.wal` in the log's folder, written front to back and never
//! rewritten. Each record is `length (u32 LE) · crc32 of the body (u32 LE) · body`, and a body
//! is a kind byte and its payload:
//! - an entry: its postcard bytes (the entry names its own log id);
//! - the vote or the committed log id (postcard);
//! - a truncation: every entry from an index on is gone;
//! - a purge: every entry up to an index is gone, with the purged log id.
//!
//! Appending is one `pwrite` of the records into the page cache, and making them durable is one
//! `fdatasync` of the segment, however many records a group holds (redb, which the log used
//! before, wrote about thirteen pages and synced them on every commit). A segment allocates its
//! file space ahead of its writes, in steps that double from [`PREALLOCATE_MIN_BYTES`] to
//! [`PREALLOCATE_BYTES`], so that a sync rarely has to write the file's size or block map too,
//! and a node that restarts often does not hold megabytes per restart.
//!
//! A write or a sync that fails leaves the segment in a state nobody knows (a partial record, or
//! pages the kernel dropped): the log then refuses every later write, and Raft stops on the
//! error. The next start replays what is whole and writes to a new segment.
//!
//! Opening replays every segment in order into an index of where each entry lies, so reads are a
//! `pread` each. A segment's replay ends at its first record that is not whole: zeros (space
//! allocated and not yet written), a length past the file's end (on a file system that cannot
//! allocate ahead, the file grows with each write), a length past [`RECORD_BYTES_MAX`] in a
//! header some sector's share of which still holds zeros, or a checksum that does not match in a
//! record some sector of which still holds the zeros its space was allocated with: what a crash
//! during a write leaves, since a disk writes a sector whole or not at all. A record whose
//! checksum fails although every sector of it holds data, or a length past the limit in a header
//! every sector's share of which was written, was altered or damaged after it was written: the
//! log refuses to open (as etcd's does) rather than take it for a tear and drop it with every
//! entry after it, entries this node may have acknowledged. Nothing is ever written after a tail: every open starts a new segment, which
//! begins with a checkpoint of the vote, the committed log id and the purge, so the older
//! segments can be deleted once every entry in them is purged. Each index must follow the one
//! before it: a gap in the replayed log is refused.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::entry::RaftEntry;
use tokio::sync::watch;

use super::network::PEER_MESSAGE_BYTES_MAX;
use super::types::{Entry, LogId, decode};

/// The size past which the writer starts a new segment (a segment holds at least one record,
/// however large).
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// The most file space a segment allocates at a time, ahead of its writes.
pub(crate) const PREALLOCATE_BYTES: u64 = 4 << 20;
/// A segment's first allocation; each next one doubles, up to [`PREALLOCATE_BYTES`].
pub(crate) const PREALLOCATE_MIN_BYTES: u64 = 64 << 10;
/// The longest record body replay accepts: no entry can be longer than a peer message.
pub(crate) const RECORD_BYTES_MAX: usize = PEER_MESSAGE_BYTES_MAX;

const HEADER_BYTES: usize = 8;
const SUFFIX: &str = "wal";
/// The unit a disk writes whole; an interrupted write leaves some of a record's sectors as they
/// were. The smallest sector there is, so that no tear goes unrecognised.
const SECTOR_BYTES: usize = 512;

const ENTRY: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
const TRUNCATE: u8 = 4;
const PURGE: u8 = 5;

fn corrupt(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("raft log {}: {what}", path.display()))
}

/// Where an entry's bytes lie.
#[derive(Clone, Copy)]
struct Place {
    segment: u64,
    offset: u64,
    len: u32,
    log_id: LogId,
}

/// What the log holds, shared by the writer and every reader.
pub(crate) struct Index {
    /// The index of `entries[0]`.
    first: u64,
    entries: VecDeque<Place>,
    files: BTreeMap<u64, Arc<File>>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    /// The last purged index and the purged log id's bytes.
    purged: Option<(u64, Vec<u8>)>,
    /// The segment and offset through which every write is durable.
    synced: (u64, u64),
    /// Where the last purge record lies: no segment goes before it is durable.
    purge_at: (u64, u64),
    /// The index below which the log is durable (0: nothing is), published on every change.
    durable: watch::Sender<u64>,
}

impl Index {
    fn new() -> Index {
        Index {
            first: 0,
            entries: VecDeque::new(),
            files: BTreeMap::new(),
            vote: None,
            committed: None,
            purged: None,
            synced: (0, 0),
            purge_at: (0, 0),
            durable: watch::Sender::new(0),
        }
    }

    /// Follows the index below which every entry the log holds is durable (entries before the
    /// first are purged, so durable too). Below, not through: "through 0" could not tell
    /// entry 0 durable from nothing durable, and entry 0 was applied before its sync.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    fn publish_durable(&self) {
        // Positions grow along the entries: a truncation's replacements lie after it.
        let synced = self.entries.partition_point(|p| (p.segment, p.offset + u64::from(p.len)) <= self.synced);
        self.durable.send_replace(self.first + synced as u64);
    }

    pub fn last_log_id(&self) -> Option<LogId> {
        self.entries.back().map(|p| p.log_id)
    }

    pub fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|p| p.log_id.index)
    }

    pub fn vote(&self) -> Option<&[u8]> {
        self.vote.as_deref()
    }

    pub fn committed(&self) -> Option<&[u8]> {
        self.committed.as_deref()
    }

    pub fn purged(&self) -> Option<&[u8]> {
        self.purged.as_ref().map(|(_, b)| b.as_slice())
    }

    /// Whether the entry at `index` is in the log and durable.
    #[cfg(test)]
    pub fn is_synced(&self, index: u64) -> bool {
        let place = index.checked_sub(self.first).and_then(|i| self.entries.get(i as usize));
        place.is_some_and(|p| (p.segment, p.offset + u64::from(p.len)) <= self.synced)
    }

    fn push(&mut self, place: Place) {
        let index = place.log_id.index;
        self.truncate(index);
        if self.entries.is_empty() {
            self.first = index;
        }
        self.entries.push_back(place);
    }

    /// Drops every entry from `from` on.
    fn truncate(&mut self, from: u64) {
        let keep = from.saturating_sub(self.first).min(self.entries.len() as u64);
        self.entries.truncate(keep as usize);
        self.publish_durable();
    }

    /// Drops every entry up to `upto`.
    fn purge(&mut self, upto: u64, log_id: Vec<u8>) {
        while self.entries.front().is_some_and(|p| p.log_id.index <= upto) {
            self.entries.pop_front();
            self.first += 1;
        }
        if self.entries.is_empty() {
            self.first = upto + 1;
        }
        self.purged = Some((upto, log_id));
        self.publish_durable();
    }

    /// The places of the entries with indexes in `from..to`, and their files, at most
    /// `bytes_max` of them by size (but at least one).
    fn places(&self, from: u64, to: u64, bytes_max: usize) -> Vec<(Place, Arc<File>)> {
        let start = from.saturating_sub(self.first) as usize;
        let end = to.saturating_sub(self.first).min(self.entries.len() as u64) as usize;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for place in self.entries.range(start.min(end)..end) {
            bytes += place.len as usize;
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            if let Some(file) = self.files.get(&place.segment) {
                out.push((*place, file.clone()));
            }
        }
        out
    }
}

/// Reads entries through the shared index.
pub(crate) fn read(index: &RwLock<Index>, from: u64, to: u64, bytes_max: usize) -> io::Result<Vec<Entry>> {
    let places = index.read().expect("raft log index lock").places(from, to, bytes_max);
    let mut entries = Vec::with_capacity(places.len());
    let mut buf = Vec::new();
    for (place, file) in places {
        buf.resize(place.len as usize, 0);
        file.read_exact_at(&mut buf, place.offset)?;
        entries.push(decode(&buf, "a log entry")?);
    }
    Ok(entries)
}

/// The writer's side of the log. Writes land in the page cache at once; a sync makes them
/// durable, taking what to sync under the log's lock ([`Wal::take_unsynced`]) and running it
/// without ([`Unsynced::run`]), so writes go on during the sync.
pub(crate) struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    index: Arc<RwLock<Index>>,
    /// Each segment and the highest entry index written to it.
    segments: BTreeMap<u64, Option<u64>>,
    current: u64,
    file: Arc<File>,
    /// Where the next record goes, and how far the file's space is allocated.
    offset: u64,
    allocated: u64,
    /// The segments written since the last sync was taken, and whether the folder has changed.
    unsynced: Vec<(u64, Arc<File>)>,
    dir_changed: bool,
    /// The first write or sync that failed: every write after it is refused.
    failed: Option<String>,
    buf: Vec<u8>,
}

/// The numbers of the segments in `dir`, in order.
fn segment_numbers(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for item in std::fs::read_dir(dir)? {
        let path = item?.path();
        if path.extension().is_some_and(|e| e == SUFFIX) {
            let number = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
            numbers.push(number.ok_or_else(|| corrupt(&path, "a segment's name is not a number"))?);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Whether the log in `dir` holds anything (an entry, a vote, a purge), found by reading it
/// alone ([`Wal::open`] starts a new segment, and cuts a torn tail), oldest segment first, up to
/// the first that holds something: a log that has begun answers after its first segment.
pub fn holds_anything(dir: &Path) -> io::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let mut index = Index::new();
    for number in segment_numbers(dir)? {
        let path = segment_path(dir, number);
        replay(&path, &File::open(&path)?, number, &mut index)?;
        if index.vote.is_some() || !index.entries.is_empty() || index.purged.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.{SUFFIX}"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What one sync must cover: the folder (if a segment was created or deleted), the segments
/// written, and the position the writes had reached.
pub(crate) struct Unsynced {
    dir: Option<PathBuf>,
    files: Vec<Arc<File>>,
    through: (u64, u64),
}

impl Unsynced {
    /// One `fdatasync` per segment written (one, but for a segment just filled), and the
    /// folder's sync if it changed.
    pub fn run(&self) -> io::Result<()> {
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        self.files.iter().try_for_each(|f| f.sync_data())
    }
}

impl Wal {
    /// Opens the log in `dir` (created if missing), replays it, and starts a new segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(Wal, Arc<RwLock<Index>>)> {
        std::fs::create_dir_all(dir)?;
        let numbers = segment_numbers(dir)?;
        let mut index = Index::new();
        let mut segments = BTreeMap::new();
        for &number in &numbers {
            let path = segment_path(dir, number);
            let file = File::options().read(true).write(true).open(&path)?;
            // What the last run wrote may still be only in the page cache.
            file.sync_data()?;
            let highest = replay(&path, &file, number, &mut index)?;
            index.files.insert(number, Arc::new(file));
            segments.insert(number, highest);
        }
        // The entries left follow the last purge: a first entry past it means entries between
        // are gone (a segment lost right after a purge that emptied the index).
        if let (Some((upto, _)), false) = (&index.purged, index.entries.is_empty())
            && index.first > upto + 1
        {
            return Err(corrupt(
                dir,
                format!("entry {} follows the purge through {upto}: the log has a gap", index.first),
            ));
        }
        let next = numbers.last().map_or(0, |n| n + 1);
        index.synced = (next, 0);
        let index = Arc::new(RwLock::new(index));
        let file = Wal::create(dir, next)?;
        index.write().expect("raft log index lock").files.insert(next, file.clone());
        segments.insert(next, None);
        let mut wal = Wal {
            dir: dir.to_owned(),
            segment_bytes,
            index: index.clone(),
            segments,
            current: next,
            file,
            offset: 0,
            allocated: 0,
            unsynced: Vec::new(),
            dir_changed: true,
            failed: None,
            buf: Vec::new(),
        };
        wal.checkpoint()?;
        wal.sync()?;
        Ok((wal, index))
    }

    /// Creates a segment; the folder's sync, with the next, makes its name durable before any
    /// of its records counts as durable.
    fn create(dir: &Path, number: u64) -> io::Result<Arc<File>> {
        let file = File::options().read(true).write(true).create_new(true).open(segment_path(dir, number))?;
        Ok(Arc::new(file))
    }

    /// Writes the vote, the committed log id and the purge at the start of the current segment,
    /// so that no older segment is needed for them.
    fn checkpoint(&mut self) -> io::Result<()> {
        let (vote, committed, purged) = {
            let index = self.index.read().expect("raft log index lock");
            (index.vote.clone(), index.committed.clone(), index.purged.clone())
        };
        self.buf.clear();
        if let Some(v) = &vote {
            frame(&mut self.buf, VOTE, &[v])?;
        }
        if let Some(c) = &committed {
            frame(&mut self.buf, COMMITTED, &[c])?;
        }
        if let Some((upto, id)) = &purged {
            frame(&mut self.buf, PURGE, &[&upto.to_le_bytes(), id])?;
        }
        self.write_buf()?;
        if purged.is_some() {
            // The segments the purge empties hold the vote and commit this checkpoint repeats:
            // they go once it is durable, not once the older purge record is.
            self.index.write().expect("raft log index lock").purge_at = (self.current, self.offset);
        }
        Ok(())
    }

    /// Writes `self.buf` at the end of the current segment.
    fn write_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.offset + self.buf.len() as u64;
        self.refuse_if_failed()?;
        if end > self.allocated {
            let step = self.allocated.clamp(PREALLOCATE_MIN_BYTES, PREALLOCATE_BYTES);
            let to = end.max(self.allocated + step).div_ceil(PREALLOCATE_MIN_BYTES) * PREALLOCATE_MIN_BYTES;
            let flags = rustix::fs::FallocateFlags::empty();
            match rustix::fs::fallocate(&*self.file, flags, self.allocated, to - self.allocated) {
                Ok(()) => self.allocated = to,
                // A file system without it: the file grows with each write instead.
                Err(rustix::io::Errno::OPNOTSUPP) => self.allocated = u64::MAX,
                Err(e) => return Err(e.into()),
            }
        }
        let written = self.file.write_all_at(&self.buf, self.offset);
        self.fail_on(written)?;
        self.offset = end;
        if self.unsynced.last().is_none_or(|(n, _)| *n != self.current) {
            self.unsynced.push((self.current, self.file.clone()));
        }
        Ok(())
    }

    fn refuse_if_failed(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => {
                Err(io::Error::other(format!("an earlier write to this raft log failed ({e}); restart the node")))
            }
            None => Ok(()),
        }
    }

    /// Passes a write's or a sync's result on, remembering a failure.
    fn fail_on(&mut self, result: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &result {
            tracing::error!(error = %e, segment = self.current, "a raft log write failed; the log takes no more writes");
            self.failed = Some(e.to_string());
        }
        result
    }

    /// Starts a new segment once the current one is full. The full one is synced first, so that
    /// no record of the new segment can reach the disk while a tail of the old one has not:
    /// after a power loss the replay would meet a torn old tail, then the new segment's entries,
    /// a gap it refuses. One `fdatasync` per [`SEGMENT_BYTES`], on the appending thread.
    fn roll_if_full(&mut self) -> io::Result<()> {
        if self.offset < self.segment_bytes {
            return Ok(());
        }
        self.sync()?;
        let next = self.current + 1;
        let file = Wal::create(&self.dir, next)?;
        self.dir_changed = true;
        self.index.write().expect("raft log index lock").files.insert(next, file.clone());
        self.segments.insert(next, None);
        (self.current, self.file, self.offset, self.allocated) = (next, file, 0, 0);
        self.checkpoint()
    }

    /// Appends entries, each given with its postcard bytes; readable once this returns.
    pub fn append(&mut self, entries: &[(LogId, Vec<u8>)]) -> io::Result<()> {
        self.roll_if_full()?;
        self.buf.clear();
        let mut places = Vec::with_capacity(entries.len());
        for (log_id, bytes) in entries {
            let at = self.offset + (self.buf.len() + HEADER_BYTES + 1) as u64;
            frame(&mut self.buf, ENTRY, &[bytes])?;
            places.push(Place { segment: self.current, offset: at, len: bytes.len() as u32, log_id: *log_id });
        }
        self.write_buf()?;
        if let Some(last) = entries.last() {
            let highest = self.segments.entry(self.current).or_default();
            *highest = Some(highest.map_or(last.0.index, |h| h.max(last.0.index)));
        }
        let mut index = self.index.write().expect("raft log index lock");
        for place in places {
            index.push(place);
        }
        Ok(())
    }

    pub fn save_vote(&mut self, vote: Vec<u8>) -> io::Result<()> {
        self.record(VOTE, &[&vote])?;
        self.index.write().expect("raft log index lock").vote = Some(vote);
        Ok(())
    }

    pub fn save_committed(&mut self, committed: Vec<u8>) -> io::Result<()> {
        self.record(COMMITTED, &[&committed])?;
        self.index.write().expect("raft log index lock").committed = Some(committed);
        Ok(())
    }

    /// Drops every entry from index `from` on.
    pub fn truncate(&mut self, from: u64) -> io::Result<()> {
        self.record(TRUNCATE, &[&from.to_le_bytes()])?;
        self.index.write().expect("raft log index lock").truncate(from);
        Ok(())
    }

    /// Drops every entry up to `upto` (whose log id is `log_id`). The segments that held only
    /// such entries go with [`Wal::delete_purged`], once this is synced.
    pub fn purge(&mut self, upto: u64, log_id: Vec<u8>) -> io::Result<()> {
        self.record(PURGE, &[&upto.to_le_bytes(), &log_id])?;
        let mut index = self.index.write().expect("raft log index lock");
        index.purge(upto, log_id);
        index.purge_at = (self.current, self.offset);
        Ok(())
    }

    /// Deletes the segments whose every entry is purged, if the last purge is durable.
    pub fn delete_purged(&mut self) -> io::Result<()> {
        let upto = {
            let index = self.index.read().expect("raft log index lock");
            match &index.purged {
                Some((upto, _)) if index.purge_at <= index.synced => *upto,
                _ => return Ok(()),
            }
        };
        let gone: Vec<u64> = self
            .segments
            .iter()
            .take_while(|&(&n, &highest)| n != self.current && highest.is_none_or(|h| h <= upto))
            .map(|(&n, _)| n)
            .collect();
        for number in gone {
            std::fs::remove_file(segment_path(&self.dir, number))?;
            self.segments.remove(&number);
            self.index.write().expect("raft log index lock").files.remove(&number);
            self.dir_changed = true;
        }
        Ok(())
    }

    fn record(&mut self, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
        self.roll_if_full()?;
        self.buf.clear();
        frame(&mut self.buf, kind, parts)?;
        self.write_buf()
    }

    /// What a sync must cover now; run it without holding the log, then report it with
    /// [`Wal::synced`].
    pub fn take_unsynced(&mut self) -> io::Result<Unsynced> {
        self.refuse_if_failed()?;
        Ok(Unsynced {
            dir: std::mem::take(&mut self.dir_changed).then(|| self.dir.clone()),
            files: std::mem::take(&mut self.unsynced).into_iter().map(|(_, f)| f).collect(),
            through: (self.current, self.offset),
        })
    }

    /// Records how a sync went: on success, every write it covers is durable.
    pub fn synced(&mut self, unsynced: &Unsynced, result: io::Result<()>) -> io::Result<()> {
        self.fail_on(result)?;
        let mut index = self.index.write().expect("raft log index lock");
        index.synced = index.synced.max(unsynced.through);
        index.publish_durable();
        Ok(())
    }

    /// Makes every record written so far durable, here and now.
    pub fn sync(&mut self) -> io::Result<()> {
        let unsynced = self.everything_unsynced()?;
        let result = unsynced.run();
        self.synced(&unsynced, result)
    }

    /// What [`Wal::sync`] covers: what no sync has taken, and the current segment and the
    /// folder whatever a sync has taken. The sync thread may have taken them and not finished
    /// its `fdatasync`: a sync of nothing would then report them durable while they are not,
    /// and a segment's rollover would let the next segment's records reach the disk before the
    /// full one's tail. Only segments older than the current one are synced already (by the
    /// rollover that closed them).
    fn everything_unsynced(&mut self) -> io::Result<Unsynced> {
        let mut unsynced = self.take_unsynced()?;
        unsynced.dir = Some(self.dir.clone());
        if !unsynced.files.iter().any(|f| Arc::ptr_eq(f, &self.file)) {
            unsynced.files.push(self.file.clone());
        }
        Ok(unsynced)
    }
}

/// Appends one record to `buf`, refusing one that replay would take for a torn record (and so
/// end the log before it) because it is longer than [`RECORD_BYTES_MAX`].
fn frame(buf: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > RECORD_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a raft log record of {len} bytes; at most {RECORD_BYTES_MAX} (RECORD_BYTES_MAX)"),
        ));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    for part in parts {
        crc.update(part);
    }
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.push(kind);
    for part in parts {
        buf.extend_from_slice(part);
    }
    Ok(())
}

/// Replays one segment into `index`; returns the highest entry index it wrote.
fn replay(path: &Path, file: &File, number: u64, index: &mut Index) -> io::Result<Option<u64>> {
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut &*file, &mut bytes)?;
    let mut highest = None;
    let mut at = 0usize;
    while let Some(header) = bytes.get(at..at + HEADER_BYTES) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len > RECORD_BYTES_MAX {
            // A tear reads a longer length only from a header across two sectors, one of them
            // not written: a length past the limit in a header written whole is damage.
            if torn(header, at) {
                break;
            }
            return Err(corrupt(
                path,
                format!(
                    "the record at byte {at} is {len} bytes long, past RECORD_BYTES_MAX, though its header was \
                     written whole: the file was altered or damaged after the write, not torn by a crash"
                ),
            ));
        }
        let Some(body) = bytes.get(at + HEADER_BYTES..at + HEADER_BYTES + len) else { break };
        if len == 0 {
            break;
        }
        if crc32fast::hash(body) != crc {
            if torn(&bytes[at..at + HEADER_BYTES + len], at) {
                break;
            }
            return Err(corrupt(
                path,
                format!(
                    "the record at byte {at} fails its checksum though every sector of it was written: \
                     the file was altered or damaged after the write, not torn by a crash"
                ),
            ));
        }
        let (kind, payload) = (body[0], &body[1..]);
        let offset = (at + HEADER_BYTES + 1) as u64;
        match kind {
            ENTRY => {
                let entry: Entry = decode(payload, "a log entry").map_err(|e| corrupt(path, e))?;
                let log_id = entry.log_id();
                let purged = index.purged.as_ref().is_some_and(|(upto, _)| log_id.index <= *upto);
                // With nothing held, the purge known so far may be a segment's checkpoint, older
                // than the purge that deleted the segments before it: `open` checks the first
                // entry against the last purge once every segment is replayed.
                let follows = index.entries.is_empty() || log_id.index <= index.first + index.entries.len() as u64;
                if !follows {
                    let after = index.last_index().map_or("nothing".into(), |i| i.to_string());
                    return Err(corrupt(path, format!("entry {} follows {after}: the log has a gap", log_id.index)));
                }
                if !purged {
                    index.push(Place { segment: number, offset, len: payload.len() as u32, log_id });
                }
                highest = Some(highest.map_or(log_id.index, |h: u64| h.max(log_id.index)));
            }
            VOTE => index.vote = Some(payload.to_vec()),
            COMMITTED => index.committed = Some(payload.to_vec()),
            TRUNCATE | PURGE if payload.len() >= 8 => {
                let at_index = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                if kind == TRUNCATE {
                    index.truncate(at_index);
                } else {
                    index.purge(at_index, payload[8..].to_vec());
                }
            }
            other => return Err(corrupt(path, format!("a record of unknown kind {other} at byte {at}"))),
        }
        at += HEADER_BYTES + len;
    }
    Ok(highest)
}

/// Whether `record`, at byte `at` of its segment and failing its checksum, was torn by a crash:
/// its share of some sector is all zeros, as the segment's space was allocated.
fn torn(record: &[u8], at: usize) -> bool {
    let mut start = 0;
    while start < record.len() {
        let end = (SECTOR_BYTES - (at + start) % SECTOR_BYTES + start).min(record.len());
        if record[start..end].iter().all(|&b| b == 0) {
            return true;
        }
        start = end;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test entries: blank entries of term 1 with the given indexes.
    fn entries(indexes: std::ops::RangeInclusive<u64>) -> Vec<(LogId, Vec<u8>)> {
        indexes
            .map(|i| {
                let entry = openraft::testing::blank_ent::<super::super::types::TypeConfig>(1, 0, i);
                (entry.log_id(), super::super::types::encode(&entry))
            })
            .collect()
    }

    fn indexes(index: &RwLock<Index>) -> Vec<u64> {
        read(index, 0, u64::MAX, usize::MAX).unwrap().iter().map(|e| e.index()).collect()
    }

    /// A closed log holding entries 0 to `last`, synced, in one segment (segment 0).
    fn synced_log(last: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        wal.append(&entries(0..=last)).unwrap();
        wal.sync().unwrap();
        dir
    }

    /// The bytes entry `i`'s record takes in a segment: header, kind and encoding.
    fn record_bytes(i: u64) -> usize {
        HEADER_BYTES + 1 + entries(i..=i)[0].1.len()
    }

    #[test]
    fn a_reopened_log_holds_what_was_written_and_starts_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            wal.append(&entries(0..=9)).unwrap();
            wal.save_vote(b"vote".to_vec()).unwrap();
            wal.truncate(8).unwrap();
            wal.append(&entries(8..=8)).unwrap();
            wal.sync().unwrap();
            assert_eq!(indexes(&index), (0..=8).collect::<Vec<_>>());
        }
        let (_wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(indexes(&index), (0..=8).collect::<Vec<_>>());
        assert_eq!(index.read().unwrap().vote(), Some(&b"vote"[..]));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "one segment per open");
    }

    /// Only what Raft wrote counts: no folder, an empty one, and a log's own empty segment are
    /// all a log that holds nothing; a vote alone, or an entry, is a log that has begun.
    #[test]
    fn a_log_holds_anything_once_raft_wrote_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("raft-log");
        assert!(!holds_anything(&log).unwrap(), "no folder");
        std::fs::create_dir(&log).unwrap();
        assert!(!holds_anything(&log).unwrap(), "an empty folder");
        let (mut wal, _) = Wal::open(&log, SEGMENT_BYTES).unwrap();
        assert!(!holds_anything(&log).unwrap(), "a new segment");
        wal.save_vote(b"vote".to_vec()).unwrap();
        assert!(holds_anything(&log).unwrap(), "a vote");
        let other = dir.path().join("other");
        let (mut wal, _) = Wal::open(&other, SEGMENT_BYTES).unwrap();
        wal.append(&entries(0..=0)).unwrap();
        assert!(holds_anything(&other).unwrap(), "an entry");
    }

    /// A sync here and now (a segment's rollover) covers the current segment and the folder
    /// although the sync thread has taken them and not finished. It covered only what was left
    /// untaken, which could be nothing: the rollover then reported the full segment durable
    /// while the thread's `fdatasync` of it still ran (only a power loss would show it).
    #[test]
    fn a_sync_here_and_now_covers_what_a_running_sync_took() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        wal.append(&entries(0..=2)).unwrap();
        let running = wal.take_unsynced().unwrap();
        assert_eq!(running.files.len(), 1, "the sync thread took the segment");
        let now = wal.everything_unsynced().unwrap();
        assert!(now.files.iter().any(|f| Arc::ptr_eq(f, &wal.file)), "the current segment is synced again");
        assert!(now.dir.is_some(), "and the folder");
        assert_eq!(now.through, running.through);
    }

    #[test]
    fn an_entry_is_durable_only_once_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        wal.append(&entries(0..=2)).unwrap();
        assert!(!index.read().unwrap().is_synced(2), "written, not synced");
        wal.sync().unwrap();
        assert!((0..=2).all(|i| index.read().unwrap().is_synced(i)));
        assert!(!index.read().unwrap().is_synced(3), "not in the log");
    }

    /// The published index tells entry 0 durable from nothing durable. Published as the index
    /// through which the log was durable, both read 0, and the state machine applied entry 0
    /// (a first node's membership) before its sync: a crash could then leave it applied and
    /// not in the log.
    #[test]
    fn the_durable_index_tells_entry_0_from_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let durable = index.read().unwrap().durable();
        wal.append(&entries(0..=0)).unwrap();
        assert_eq!(*durable.borrow(), 0, "entry 0 is written, not synced: nothing is durable");
        wal.sync().unwrap();
        assert_eq!(*durable.borrow(), 1, "entry 0 is durable");
    }

    #[test]
    fn a_segment_allocates_ahead_in_doubling_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let size = || std::fs::metadata(segment_path(dir.path(), 0)).unwrap().len();
        wal.append(&entries(0..=0)).unwrap();
        assert_eq!(size(), PREALLOCATE_MIN_BYTES, "a fresh segment holds little");
        let big = vec![(entries(1..=1)[0].0, vec![0; PREALLOCATE_MIN_BYTES as usize])];
        wal.append(&big).unwrap();
        assert_eq!(size(), 2 * PREALLOCATE_MIN_BYTES, "the next step doubles the space");
        for i in 2..200 {
            wal.append(&[(entries(i..=i)[0].0, vec![0; PREALLOCATE_MIN_BYTES as usize])]).unwrap();
        }
        let steps = size() / PREALLOCATE_BYTES;
        assert!(steps >= 3 && size() % PREALLOCATE_MIN_BYTES == 0, "grown in steps up to the largest: {}", size());
        assert!(size() - wal.offset < PREALLOCATE_BYTES + PREALLOCATE_MIN_BYTES, "never more than a step ahead");
    }

    #[test]
    fn after_a_failed_write_the_log_takes_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        wal.append(&entries(0..=1)).unwrap();
        let _ = wal.fail_on(Err(io::Error::other("no space left on device")));
        let e = wal.append(&entries(2..=2)).expect_err("refused");
        assert!(e.to_string().contains("no space left on device"), "{e}");
        assert!(wal.sync().is_err() && wal.save_vote(b"v".to_vec()).is_err());
        assert_eq!(indexes(&index), vec![0, 1], "nothing after the failure reached the index");
    }

    #[test]
    fn a_torn_tail_ends_the_replay_and_is_never_written_after() {
        let dir = synced_log(199);
        // A crash in the middle of the write of an entry that crosses a sector boundary: its
        // header and first bytes reached the disk, the sector holding its end did not (it reads
        // as the zeros its space was allocated with), and the sectors after it did.
        let ends: Vec<usize> = (0..=199)
            .scan(0, |end, i| {
                *end += record_bytes(i);
                Some(*end)
            })
            .collect();
        let crosses = |i: usize| {
            let boundary = ends[i] / SECTOR_BYTES * SECTOR_BYTES;
            (ends[i] - record_bytes(i as u64) + HEADER_BYTES < boundary && boundary < ends[i]).then_some(boundary)
        };
        let (torn, boundary) = (0..200).find_map(|i| crosses(i).map(|b| (i, b))).expect("an entry crosses a sector");
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[boundary..boundary + SECTOR_BYTES].fill(0);
        std::fs::write(&path, &bytes).unwrap();

        let before: Vec<u64> = (0..torn as u64).collect();
        let (mut wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(indexes(&index), before, "the replay stops at the torn record");
        wal.append(&entries(torn as u64..=torn as u64)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        let through: Vec<u64> = (0..=torn as u64).collect();
        assert_eq!(indexes(&index), through, "the old entries beyond the tear stay gone");
    }

    /// A record whose checksum fails while every sector of it was written was altered after
    /// the write: the log refuses to open, naming the segment, instead of replaying up to it and
    /// dropping it and every entry after it. (It used to open with entries 0 and 1 alone.)
    #[test]
    fn a_record_altered_after_its_write_is_refused_not_taken_for_a_tear() {
        let dir = synced_log(4);
        let inside_entry_2 = (0..=1).map(record_bytes).sum::<usize>() + record_bytes(2) / 2;
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[inside_entry_2] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let refused = Wal::open(dir.path(), SEGMENT_BYTES).err().expect("the altered log is refused").to_string();
        assert!(refused.contains("fails its checksum") && refused.contains(".wal"), "{refused}");
    }

    /// A record's share of each sector it spans is checked apart: one all-zero share marks a
    /// tear, wherever the record starts; one written byte makes a share whole.
    #[test]
    fn a_tear_is_a_sector_share_of_zeros() {
        let written = vec![7u8; 1000];
        for at in [0, 100, 511, 512] {
            assert!(!torn(&written, at), "every share written (at {at})");
            let second = SECTOR_BYTES - at % SECTOR_BYTES;
            let share = second..(second + SECTOR_BYTES).min(written.len());
            let mut lost = written.clone();
            lost[share.clone()].fill(0);
            assert!(torn(&lost, at), "the second sector's share is zeros (at {at})");
            lost[share.end - 1] = 7;
            assert!(!torn(&lost, at), "a share with one written byte is whole (at {at})");
        }
    }

    /// A full segment is durable before the next takes a record: no power loss can leave the
    /// new segment's entries on disk behind a torn tail of the old one. (Before, nothing was
    /// synced until the next sync, which covered both.)
    #[test]
    fn a_full_segment_is_synced_before_the_next_takes_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, index) = Wal::open(dir.path(), 1).unwrap();
        wal.append(&entries(0..=0)).unwrap();
        let first = (wal.current, wal.offset);
        assert!(index.read().unwrap().synced < first, "nothing synced yet");
        wal.append(&entries(1..=1)).unwrap();
        assert_ne!(wal.current, first.0, "the second entry went to a new segment");
        assert_eq!(index.read().unwrap().synced, first, "the full segment was synced before it");
    }

    #[test]
    fn a_full_segment_rolls_and_a_purge_deletes_the_segments_it_empties() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, index) = Wal::open(dir.path(), 1).unwrap();
        wal.save_vote(b"vote".to_vec()).unwrap();
        for i in 0..10 {
            wal.append(&entries(i..=i)).unwrap();
        }
        let segments = || std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(segments(), 11, "a segment of 1 byte holds one record");
        wal.purge(6, b"purged".to_vec()).unwrap();
        assert_eq!(indexes(&index), vec![7, 8, 9]);
        wal.delete_purged().unwrap();
        assert_eq!(segments(), 12, "no segment goes before the purge is durable");
        wal.sync().unwrap();
        wal.delete_purged().unwrap();
        assert_eq!(segments(), 4, "the segments holding 7, 8 and 9, and the one holding the purge");
        drop(wal);
        let (_, index) = Wal::open(dir.path(), 1).unwrap();
        assert_eq!(indexes(&index), vec![7, 8, 9]);
        let index = index.read().unwrap();
        assert_eq!(
            (index.vote(), index.purged()),
            (Some(&b"vote"[..]), Some(&b"purged"[..])),
            "kept by the checkpoints"
        );
    }

    /// The segments a purge empties are deleted only once the next segment's checkpoint (which
    /// repeats their vote and commit) is durable: deleted when only the older purge record was,
    /// a power loss could leave a log with no vote, and the node could vote twice in a term.
    #[test]
    fn purged_segments_go_only_once_the_checkpoint_after_them_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1).unwrap();
        wal.save_vote(b"vote".to_vec()).unwrap();
        wal.append(&entries(0..=2)).unwrap();
        wal.purge(2, b"purged".to_vec()).unwrap();
        wal.sync().unwrap();
        let first = wal.current;
        // Rolls to a new segment, whose checkpoint is written and not yet synced.
        wal.append(&entries(3..=3)).unwrap();
        assert_ne!(wal.current, first);
        wal.delete_purged().unwrap();
        assert!(segment_path(dir.path(), first).exists(), "deleted before the checkpoint was durable");
        wal.sync().unwrap();
        wal.delete_purged().unwrap();
        assert!(!segment_path(dir.path(), first).exists());
    }

    /// Segments deleted by a later purge leave the oldest survivor starting with a checkpoint of
    /// an older purge, and entries well past it: that is no gap, and the log opens. (Checked
    /// against the purge known so far at each entry, it refused to open after any such deletion.)
    #[test]
    fn a_log_whose_oldest_segments_a_later_purge_deleted_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, index) = Wal::open(dir.path(), 1).unwrap();
            wal.append(&entries(0..=2)).unwrap();
            wal.purge(1, b"one".to_vec()).unwrap();
            wal.append(&entries(3..=5)).unwrap();
            wal.purge(4, b"four".to_vec()).unwrap();
            wal.append(&entries(6..=8)).unwrap();
            wal.sync().unwrap();
            let oldest = index.read().unwrap().files.keys().next().copied().unwrap();
            wal.delete_purged().unwrap();
            assert!(!segment_path(dir.path(), oldest).exists(), "the segment of entries 0 to 2 went");
        }
        let (_, index) = Wal::open(dir.path(), 1).unwrap();
        assert_eq!(indexes(&index), vec![5, 6, 7, 8]);
    }

    /// A gap right after a purge is a gap too: with no entry left to follow, the first entry
    /// replayed must follow the purged ones (before, any entry was taken there).
    #[test]
    fn a_gap_right_after_a_purge_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let holding = |index: &RwLock<Index>, i: u64| {
            let index = index.read().unwrap();
            index.entries[(i - index.first) as usize].segment
        };
        let lost = {
            let (mut wal, index) = Wal::open(dir.path(), 1).unwrap();
            wal.append(&entries(0..=2)).unwrap();
            wal.purge(2, b"purged".to_vec()).unwrap();
            wal.append(&entries(3..=5)).unwrap();
            wal.append(&entries(6..=8)).unwrap();
            wal.sync().unwrap();
            assert_ne!(holding(&index, 5), holding(&index, 6));
            holding(&index, 3)
        };
        std::fs::remove_file(segment_path(dir.path(), lost)).unwrap();
        let e = Wal::open(dir.path(), 1).err().expect("a gap");
        assert!(e.to_string().contains("the log has a gap"), "{e}");
    }

    #[test]
    fn a_gap_in_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path(), 1).unwrap();
            wal.append(&entries(0..=2)).unwrap();
            wal.append(&entries(3..=5)).unwrap();
            wal.append(&entries(6..=8)).unwrap();
            wal.sync().unwrap();
        }
        // The middle segment, entries 3 to 5, is lost.
        std::fs::remove_file(segment_path(dir.path(), 1)).unwrap();
        let e = Wal::open(dir.path(), 1).err().expect("a gap");
        assert!(e.to_string().contains("the log has a gap"), "{e}");
    }

    /// A length past the limit in a header written whole is damage, and the log refuses to open:
    /// taken for a tear, it dropped the synced entries after it without a word. Only a header
    /// across two sectors, one not written, reads such a length after a crash: that one ends the
    /// replay.
    #[test]
    fn a_record_longer_than_the_limit_is_damage_unless_its_header_was_torn() {
        let dir = synced_log(1);
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = record_bytes(0);
        assert!(second % SECTOR_BYTES + HEADER_BYTES <= SECTOR_BYTES, "the header sits in one sector");
        bytes[second..second + 4].copy_from_slice(&(RECORD_BYTES_MAX as u32 + 1).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = Wal::open(dir.path(), SEGMENT_BYTES).err().expect("damage");
        assert!(e.to_string().contains("past RECORD_BYTES_MAX"), "{e}");

        // Entry 0 padded so that entry 1's header starts 2 bytes before a sector's end; a crash
        // wrote the next sector and not those 2 bytes.
        let entry_starts = |dir: &Path| {
            let bytes = std::fs::read(segment_path(dir, 0)).unwrap();
            let (mut at, mut starts) = (0, Vec::new());
            while let Some(header) = bytes.get(at..at + HEADER_BYTES) {
                let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
                if len == 0 {
                    break;
                }
                if bytes[at + HEADER_BYTES] == ENTRY {
                    starts.push(at);
                }
                at += HEADER_BYTES + len;
            }
            (bytes, starts)
        };
        let write = |payload_len: usize| {
            let dir = tempfile::tempdir().unwrap();
            let (log_id, mut padded) = entries(0..=0).remove(0);
            padded.resize(payload_len, 0);
            let (mut wal, _) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            wal.append(&[(log_id, padded)]).unwrap();
            wal.append(&entries(1..=1)).unwrap();
            wal.sync().unwrap();
            dir
        };
        let first = entry_starts(write(100).path()).1[0];
        let dir = write(2 * SECTOR_BYTES - 2 - first - HEADER_BYTES - 1);
        let (mut bytes, starts) = entry_starts(dir.path());
        let header = starts[1];
        assert_eq!(header % SECTOR_BYTES, SECTOR_BYTES - 2);
        bytes[header..header + 2].fill(0);
        bytes[header + 2..header + 4].fill(0xff);
        std::fs::write(segment_path(dir.path(), 0), &bytes).unwrap();
        let (_, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(indexes(&index), vec![0]);
    }

    #[test]
    fn a_record_is_written_up_to_the_limit_and_refused_past_it() {
        let dir = tempfile::tempdir().unwrap();
        // An entry's encoding padded out: decoding ignores what follows the entry.
        let padded = |i: u64, len: usize| {
            let (log_id, mut bytes) = entries(i..=i).remove(0);
            bytes.resize(len, 0);
            vec![(log_id, bytes)]
        };
        let (at_limit, past) = (padded(0, RECORD_BYTES_MAX - 1), padded(1, RECORD_BYTES_MAX));
        {
            let (mut wal, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
            wal.append(&at_limit).unwrap();
            let e = wal.append(&past).expect_err("past the limit");
            assert!(e.to_string().contains("RECORD_BYTES_MAX"), "{e}");
            wal.append(&entries(1..=1)).expect("the refusal wrote nothing and failed nothing");
            wal.sync().unwrap();
            assert_eq!(indexes(&index), vec![0, 1]);
        }
        let (_, index) = Wal::open(dir.path(), SEGMENT_BYTES).unwrap();
        assert_eq!(indexes(&index), vec![0, 1], "the longest record replays");
    }
}

//! Ledger chunk files: append-only, one record after another, never rewritten.
//!
//! A file is `CLLEDG01 ‖ first seqno (u64 LE)` then records, each `u32 LE length ‖ postcard
//! record`. A new file starts only right after a signature entry, so every finished file ends on
//! one. A file that continues the ledger after a snapshot starts with a `Start` record carrying
//! the chain head and the tree frontier at that point.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::entry::{EntryKind, LedgerEntry};
use super::merkle::Hash;

const MAGIC: &[u8; 8] = b"CLLEDG01";
const HEADER_BYTES: u64 = 16;
/// A record longer than this is corruption, not data.
const RECORD_BYTES_MAX: u32 = 256 << 20;
/// Most bytes of framed records [`LedgerFiles::append`] holds before writing them: a batch of
/// small entries goes in one write, and a large catch-up batch costs about this much memory
/// beside its entries, not as much again.
const WRITE_BYTES_MAX: usize = 1 << 20;

/// The state a ledger continues from after a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartState {
    /// The first seqno after the snapshot: entries `0..next` are in it.
    pub next: u64,
    /// The chain hash through entry `next - 1`.
    pub chain: Hash,
    /// The tree's complete subtrees at `next` leaves: (level, index, hash).
    pub frontier: Vec<(u8, u64, Hash)>,
}

// Nearly every record is an entry: boxing it would allocate for the common case.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Start(StartState),
    Entry(LedgerEntry),
}

/// A [`Record`] to write, borrowed: the same variants in the same order, so the same bytes.
#[derive(Serialize)]
enum RecordRef<'r> {
    Start(&'r StartState),
    Entry(&'r LedgerEntry),
}

/// Appends `record` to `out` as the file holds it: its length, then its postcard encoding.
fn frame(record: &RecordRef<'_>, out: &mut Vec<u8>) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    *out = postcard::to_extend(record, std::mem::take(out)).expect("ledger records encode");
    let len = u32::try_from(out.len() - at - 4).expect("a record is under 4 GiB");
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
}

/// How a file's records end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a complete record.
    Clean,
    /// The last record is incomplete (a crash mid-write): the valid part ends at `valid_bytes`.
    Torn { valid_bytes: u64 },
    /// A complete-length record does not decode: not a crash, a damaged file.
    Corrupt { offset: u64, reason: String },
}

/// One file's records, in order.
pub struct Chunk {
    pub path: PathBuf,
    pub first_seqno: u64,
    pub records: Vec<Record>,
    /// Where each record ends: the file's valid length after it.
    pub ends: Vec<u64>,
    pub tail: Tail,
}

/// The chunk files of a ledger folder, ordered by first seqno.
pub(crate) fn chunk_paths(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ledger"))
        .collect();
    paths.sort();
    Ok(paths)
}

/// Every entry in a ledger folder's files, in order, for tools that read a ledger whole (a
/// snapshot's start record is passed over). It checks nothing: `verify::verify_dir` is the audit.
/// A file whose records end damaged is an error; a torn last record (a crash mid-write) ends the
/// entries there.
pub fn read_entries(dir: &Path) -> std::io::Result<Vec<LedgerEntry>> {
    let mut entries = Vec::new();
    for path in chunk_paths(dir)? {
        let chunk = read_chunk(&path)?;
        if let Tail::Corrupt { offset, reason } = &chunk.tail {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is damaged at byte {offset}: {reason}", path.display()),
            ));
        }
        entries.extend(chunk.records.into_iter().filter_map(|r| match r {
            Record::Entry(e) => Some(e),
            Record::Start(_) => None,
        }));
    }
    Ok(entries)
}

/// Writes `entries`, from genesis on, into the ledger folder `dir` as a node writes them: the
/// counterpart of [`read_entries`], for tools and tests that build a ledger. It checks nothing.
pub fn write_entries(dir: &Path, entries: &[LedgerEntry]) -> std::io::Result<()> {
    LedgerFiles::open(dir, crate::settings::LedgerSection::default().chunk_bytes)?.append(entries)
}

/// Where [`LedgerFiles::restart_at`] keeps the files a snapshot at `next` superseded: a folder of
/// their own, which verifies as a ledger by itself.
pub fn set_aside_dir(dir: &Path, next: u64) -> PathBuf {
    dir.join(format!("before-{next:016}"))
}

fn file_name(first_seqno: u64) -> String {
    format!("{first_seqno:016}.ledger")
}

/// The first seqno a chunk file's name gives, whatever its content.
pub(crate) fn first_seqno_of(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

/// The length of a chunk file's header.
pub(crate) const CHUNK_HEADER_BYTES: u64 = HEADER_BYTES;

/// Reads every record of a file, stopping at the first that is incomplete or does not decode.
pub(crate) fn read_chunk(path: &Path) -> std::io::Result<Chunk> {
    let mut bytes = Vec::new();
    BufReader::new(File::open(path)?).read_to_end(&mut bytes)?;
    let bad = |reason: &str| Chunk {
        path: path.to_owned(),
        first_seqno: 0,
        records: Vec::new(),
        ends: Vec::new(),
        tail: Tail::Corrupt { offset: 0, reason: reason.to_owned() },
    };
    if bytes.len() < HEADER_BYTES as usize {
        return Ok(bad("the file is shorter than its header"));
    }
    if &bytes[..8] != MAGIC {
        return Ok(bad("the file does not start with the ledger header"));
    }
    let first_seqno = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let mut records = Vec::new();
    let mut ends = Vec::new();
    let mut at = HEADER_BYTES as usize;
    let tail = loop {
        if at == bytes.len() {
            break Tail::Clean;
        }
        let Some(len) = bytes.get(at..at + 4) else { break Tail::Torn { valid_bytes: at as u64 } };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes"));
        if len > RECORD_BYTES_MAX {
            break Tail::Corrupt { offset: at as u64, reason: format!("a record claims {len} bytes") };
        }
        let Some(body) = bytes.get(at + 4..at + 4 + len as usize) else { break Tail::Torn { valid_bytes: at as u64 } };
        match decode_record(body) {
            Ok(r) => records.push(r),
            Err(reason) => break Tail::Corrupt { offset: at as u64, reason },
        }
        at += 4 + len as usize;
        ends.push(at as u64);
    };
    Ok(Chunk { path: path.to_owned(), first_seqno, records, ends, tail })
}

/// Whether a chunk file's first record is a snapshot start record: read from its head alone.
fn starts_with_start_record(path: &Path) -> std::io::Result<bool> {
    let mut input = BufReader::new(File::open(path)?);
    let mut head = [0u8; HEADER_BYTES as usize + 4];
    if input.read_exact(&mut head).is_err() || &head[..8] != MAGIC {
        return Ok(false);
    }
    let len = u32::from_le_bytes(head[HEADER_BYTES as usize..].try_into().expect("4 bytes"));
    if len > RECORD_BYTES_MAX {
        return Ok(false);
    }
    let mut body = Vec::new();
    input.take(u64::from(len)).read_to_end(&mut body)?;
    Ok(matches!(decode_record(&body), Ok(Record::Start(_))))
}

/// A record from its length-framed body, which it must fill: postcard ignores bytes after a
/// value, so without the check one record would have many encodings.
fn decode_record(body: &[u8]) -> Result<Record, String> {
    match postcard::take_from_bytes::<Record>(body) {
        Ok((record, [])) => Ok(record),
        Ok((_, rest)) => Err(format!("a record has {} bytes after its end", rest.len())),
        Err(e) => Err(format!("a record does not decode: {e}")),
    }
}

/// A folder written before [`LedgerFiles::restart_at`] set older files aside holds them in front
/// of a snapshot's start record: sets them aside now, as a snapshot install does today.
pub(crate) fn set_aside_before_newest_start(dir: &Path) -> std::io::Result<()> {
    let paths = chunk_paths(dir)?;
    for (i, path) in paths.iter().enumerate().skip(1).rev() {
        if starts_with_start_record(path)? {
            let next = first_seqno_of(path).unwrap_or_default();
            let aside = set_aside_dir(dir, next);
            std::fs::create_dir_all(&aside)?;
            for older in &paths[..i] {
                tracing::warn!(file = %older.display(), aside = %aside.display(), "setting aside a ledger file before a snapshot");
                std::fs::rename(older, aside.join(older.file_name().expect("a chunk path names a file")))?;
            }
            cloister_crypto::identity::sync_dir(&aside)?;
            cloister_crypto::identity::sync_dir(dir)?;
            break;
        }
    }
    Ok(())
}

/// The file being appended to.
struct OpenChunk {
    file: File,
    bytes: u64,
}

/// Appends ledger entries to chunk files in a folder.
pub(crate) struct LedgerFiles {
    dir: PathBuf,
    chunk_bytes_target: u64,
    /// [`WRITE_BYTES_MAX`]; smaller in tests.
    write_bytes_max: usize,
    current: Option<OpenChunk>,
}

impl LedgerFiles {
    /// Opens a ledger folder for appending to its last file (or a new one, on the next append).
    pub fn open(dir: &Path, chunk_bytes_target: u64) -> std::io::Result<LedgerFiles> {
        std::fs::create_dir_all(dir)?;
        let mut files =
            LedgerFiles { dir: dir.to_owned(), chunk_bytes_target, write_bytes_max: WRITE_BYTES_MAX, current: None };
        if let Some(last) = chunk_paths(dir)?.pop() {
            let file = OpenOptions::new().append(true).open(&last)?;
            let bytes = file.metadata()?.len();
            files.current = Some(OpenChunk { file, bytes });
        }
        Ok(files)
    }

    fn create(&mut self, first_seqno: u64) -> std::io::Result<()> {
        let path = self.dir.join(file_name(first_seqno));
        let mut file = OpenOptions::new().create_new(true).append(true).open(&path)?;
        file.write_all(MAGIC)?;
        file.write_all(&first_seqno.to_le_bytes())?;
        // The new file's name must be as durable as the entries about to be synced into it.
        cloister_crypto::identity::sync_dir(&self.dir)?;
        self.current = Some(OpenChunk { file, bytes: HEADER_BYTES });
        Ok(())
    }

    /// Writes framed records to the open file, one system call for however many, and empties
    /// `framed`; nothing framed, nothing written.
    fn write(&mut self, framed: &mut Vec<u8>) -> std::io::Result<()> {
        if framed.is_empty() {
            return Ok(());
        }
        let current = self.current.as_mut().expect("a chunk is open");
        current.file.write_all(framed)?;
        current.bytes += framed.len() as u64;
        framed.clear();
        Ok(())
    }

    /// Appends entries, without waiting for the disk ([`LedgerFiles::sync`] does): the records
    /// bound for one file go in one write (up to [`WRITE_BYTES_MAX`]), not one each (a batch of
    /// entries cost as many system calls on every node). A signature entry ends the file
    /// (durably) when it has reached the target size.
    pub fn append(&mut self, entries: &[LedgerEntry]) -> std::io::Result<()> {
        let mut framed = Vec::new();
        for entry in entries {
            if self.current.is_none() {
                self.create(entry.seqno)?;
            }
            frame(&RecordRef::Entry(entry), &mut framed);
            let bytes = self.current.as_ref().map_or(0, |c| c.bytes) + framed.len() as u64;
            if entry.payload.kind() == EntryKind::Signature && bytes >= self.chunk_bytes_target {
                self.write(&mut framed)?;
                self.close()?;
            } else if framed.len() >= self.write_bytes_max {
                self.write(&mut framed)?;
            }
        }
        self.write(&mut framed)
    }

    /// Makes everything appended so far durable (closed files were synced as they closed).
    pub fn sync(&mut self) -> std::io::Result<()> {
        if let Some(c) = &self.current {
            c.file.sync_data()?;
        }
        Ok(())
    }

    fn close(&mut self) -> std::io::Result<()> {
        if let Some(c) = self.current.take() {
            c.file.sync_all()?;
        }
        Ok(())
    }

    /// Continues the ledger after a snapshot: a new file whose first record is the start state.
    /// The files before it move to [`set_aside_dir`]: a ledger folder holds one unbroken run of
    /// entries, and a start record is only ever at the head of its oldest file, so the offline walk
    /// can refuse one anywhere else as a gap in disguise.
    pub fn restart_at(&mut self, start: StartState) -> std::io::Result<()> {
        self.close()?;
        let path = self.dir.join(file_name(start.next));
        if path.exists() {
            // An earlier install at the same point left this file: it holds nothing else yet.
            std::fs::remove_file(&path)?;
        }
        let older = chunk_paths(&self.dir)?;
        if !older.is_empty() {
            let aside = set_aside_dir(&self.dir, start.next);
            std::fs::create_dir_all(&aside)?;
            for p in older {
                std::fs::rename(&p, aside.join(p.file_name().expect("a chunk path names a file")))?;
            }
            cloister_crypto::identity::sync_dir(&aside)?;
        }
        cloister_crypto::identity::sync_dir(&self.dir)?;
        self.create(start.next)?;
        let mut framed = Vec::new();
        frame(&RecordRef::Start(&start), &mut framed);
        self.write(&mut framed)?;
        self.current.as_ref().expect("just created").file.sync_all()
    }
}

/// Property tests: a chunk file of any content — a valid header followed by anything, or
/// anything at all — is read up to where it stops making sense, and the offline walk refuses it
/// by name; never a panic, never an allocation out of proportion to the file.
#[cfg(test)]
mod fuzz {
    use cloister_test_support::proptest::prelude::*;
    use cloister_test_support::{config, largest_allocation};

    use super::*;

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn any_chunk_content_is_read_or_refused(
            with_header in any::<bool>(),
            first in 0u64..4,
            body in prop::collection::vec(any::<u8>(), 0..4096),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut bytes = Vec::new();
            if with_header {
                bytes.extend_from_slice(MAGIC);
                bytes.extend_from_slice(&first.to_le_bytes());
            }
            bytes.extend_from_slice(&body);
            let path = dir.path().join(file_name(first));
            std::fs::write(&path, &bytes).unwrap();
            let (chunk, largest) = largest_allocation(|| read_chunk(&path).unwrap());
            prop_assert!(largest <= 4 * bytes.len() + (2 << 20), "allocated {largest} bytes for {}", bytes.len());
            prop_assert_eq!(chunk.records.len(), chunk.ends.len());
            prop_assert!(chunk.ends.iter().all(|e| *e <= bytes.len() as u64));
            let (walk, largest) = largest_allocation(|| crate::verify::verify_dir(dir.path(), None, None, None).map(|r| r.entries));
            prop_assert!(largest <= 4 * bytes.len() + (2 << 20), "the walk allocated {largest} bytes");
            if let Err(fault) = walk {
                prop_assert!(!fault.to_string().is_empty());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Payload, TxEntry, TxKind};

    /// Entry `seqno`: a signature (unsigned: the files do not check), or an app write of
    /// `private_bytes` sealed-looking bytes.
    fn entry(seqno: u64, signature: bool, private_bytes: usize) -> LedgerEntry {
        let tx = TxEntry {
            uid: [seqno as u8; 16],
            kind: if signature { TxKind::Signature } else { TxKind::App },
            public: Default::default(),
            private: (!signature).then(|| vec![7; private_bytes]),
            claims_digest: None,
            signature: None,
        };
        LedgerEntry { seqno, term: 2, payload: Payload::Tx(tx), chain: [seqno as u8; 32] }
    }

    /// The records of every file in `dir`, file by file.
    fn files_in(dir: &Path) -> Vec<Vec<Record>> {
        chunk_paths(dir).unwrap().iter().map(|p| read_chunk(p).unwrap().records).collect()
    }

    #[test]
    fn a_borrowed_record_is_framed_as_the_record_it_borrows() {
        let start = StartState { next: 9, chain: [3; 32], frontier: vec![(0, 8, [4; 32])] };
        let app = entry(9, false, 40);
        for (borrowed, owned) in [
            (RecordRef::Start(&start), Record::Start(start.clone())),
            (RecordRef::Entry(&app), Record::Entry(app.clone())),
        ] {
            let body = postcard::to_allocvec(&owned).unwrap();
            let mut expected = u32::try_from(body.len()).unwrap().to_le_bytes().to_vec();
            expected.extend_from_slice(&body);
            let mut framed = vec![1, 2];
            frame(&borrowed, &mut framed);
            assert_eq!(framed[2..], expected[..], "{owned:?}");
        }
    }

    /// A record's body must hold the record and nothing more: postcard ignores what follows a
    /// value, so a byte added inside a record (its length raised to match) read as the same
    /// record, and a file that is not the one the node wrote passed as its own.
    #[test]
    fn a_record_with_bytes_after_its_end_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = LedgerFiles::open(dir.path(), 1 << 20).unwrap();
        files.append(&[entry(0, false, 10), entry(1, true, 0)]).unwrap();
        files.sync().unwrap();
        let path = chunk_paths(dir.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = HEADER_BYTES as usize;
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        bytes[at..at + 4].copy_from_slice(&(len + 1).to_le_bytes());
        bytes.insert(at + 4 + len as usize, 0);
        std::fs::write(&path, &bytes).unwrap();
        let chunk = read_chunk(&path).unwrap();
        assert!(chunk.records.is_empty());
        let Tail::Corrupt { offset, reason } = chunk.tail else { panic!("read as sound") };
        assert_eq!((offset, reason.as_str()), (HEADER_BYTES, "a record has 1 bytes after its end"));
        assert!(read_entries(dir.path()).unwrap_err().to_string().contains("after its end"));
    }

    /// One append of many entries: each file still ends on the first signature entry past the
    /// target size, every entry is in the files once and in order, and a signature before the
    /// target ends nothing.
    #[test]
    fn one_append_across_full_files_ends_each_on_a_signature() {
        let dir = tempfile::tempdir().unwrap();
        // Each app record is a little over 100 bytes: a file is full after three of them.
        let mut files = LedgerFiles::open(dir.path(), 300).unwrap();
        let signatures = [1, 5, 6, 9];
        let entries: Vec<LedgerEntry> = (0..12).map(|s| entry(s, signatures.contains(&s), 100)).collect();
        files.append(&entries[..11]).unwrap();
        files.append(&entries[11..]).unwrap();
        files.sync().unwrap();
        let seqnos: Vec<Vec<u64>> = files_in(dir.path())
            .iter()
            .map(|records| {
                records
                    .iter()
                    .map(|r| match r {
                        Record::Entry(e) => e.seqno,
                        Record::Start(_) => panic!("no start record was written"),
                    })
                    .collect()
            })
            .collect();
        assert_eq!(seqnos, [vec![0, 1, 2, 3, 4, 5], vec![6, 7, 8, 9], vec![10, 11]]);
        let read: Vec<Record> = files_in(dir.path()).into_iter().flatten().collect();
        assert_eq!(read, entries.into_iter().map(Record::Entry).collect::<Vec<_>>());
    }

    /// `WRITE_BYTES_MAX` at its edge: with the limit at one record, every record is written as
    /// soon as it is framed, and the files read the same as with one write per file.
    #[test]
    fn records_past_the_write_limit_are_written_in_parts_and_read_the_same() {
        let signatures = [1, 5, 6, 9];
        let entries: Vec<LedgerEntry> = (0..12).map(|s| entry(s, signatures.contains(&s), 100)).collect();
        let whole = tempfile::tempdir().unwrap();
        LedgerFiles::open(whole.path(), 300).unwrap().append(&entries).unwrap();
        let parts = tempfile::tempdir().unwrap();
        let mut files = LedgerFiles::open(parts.path(), 300).unwrap();
        let mut one = Vec::new();
        frame(&RecordRef::Entry(&entries[0]), &mut one);
        files.write_bytes_max = one.len();
        files.append(&entries).unwrap();
        assert_eq!(files_in(parts.path()), files_in(whole.path()));
        assert_eq!(files_in(parts.path()).len(), 3);
    }
}

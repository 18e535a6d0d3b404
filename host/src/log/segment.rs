//! Append-only segment files holding the log's event chunks.
//!
//! Events live in files of our own (`events/NNNNNNNN.seg`), written sequentially and synced
//! with `fdatasync`; sled keeps only a small index entry per chunk. The segments are the
//! log's write-ahead record: an append is acknowledged once its chunks are synced here, and
//! at start-up chunks past the last indexed one are checked (length, CRC, position) and
//! indexed again. Bytes after the last complete chunk (a write cut short by a crash, never
//! acknowledged) are truncated.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::LogError;

/// A segment is closed and a new one started past this size.
pub(super) const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Where a chunk's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkLocation {
    pub segment: u32,
    pub offset: u64,
    pub len: u32,
}

impl ChunkLocation {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let msg = format!("{what} {}", path.display());
    move |e| LogError::Storage(format!("{msg}: {e}"))
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:08}.seg"))
}

/// Reads chunks from any segment; cheap to share between threads.
#[derive(Clone)]
pub(super) struct SegmentReader {
    dir: PathBuf,
    files: Arc<RwLock<HashMap<u32, Arc<File>>>>,
}

impl SegmentReader {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: Arc::default(),
        }
    }

    fn file(&self, segment: u32) -> Result<Arc<File>, LogError> {
        if let Some(f) = self.files.read().expect("segment files lock").get(&segment) {
            return Ok(f.clone());
        }
        let path = segment_path(&self.dir, segment);
        let f = Arc::new(File::open(&path).map_err(io("cannot open segment", &path))?);
        self.files
            .write()
            .expect("segment files lock")
            .insert(segment, f.clone());
        Ok(f)
    }

    /// The bytes of the chunk at `loc`.
    pub fn read(&self, loc: ChunkLocation) -> Result<Vec<u8>, LogError> {
        let mut buf = vec![0u8; loc.len as usize];
        self.file(loc.segment)?
            .read_exact_at(&mut buf, loc.offset)
            .map_err(|e| {
                LogError::Corrupt(format!(
                    "chunk of {} bytes at {} in segment {}: {e}",
                    loc.len, loc.offset, loc.segment
                ))
            })?;
        Ok(buf)
    }
}

/// Appends chunks to the current segment; owned by the log's writer thread.
pub(super) struct SegmentWriter {
    dir: PathBuf,
    segment: u32,
    file: File,
    offset: u64,
}

impl SegmentWriter {
    /// Opens the segment directory so that writing continues at `end` (segment, offset),
    /// just after the last complete chunk: later bytes and later segment files are discarded.
    pub fn open(dir: &Path, end: (u32, u64)) -> Result<Self, LogError> {
        fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let (segment, offset) = end;
        // Segments created after the last indexed chunk hold nothing committed.
        for entry in fs::read_dir(dir).map_err(io("cannot list", dir))?.flatten() {
            let name = entry.file_name();
            let n = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(n) = n
                && n > segment
            {
                let p = entry.path();
                fs::remove_file(&p).map_err(io("cannot remove uncommitted segment", &p))?;
                tracing::warn!(segment = n, "removed a segment with no committed chunk");
            }
        }
        let path = segment_path(dir, segment);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open segment", &path))?;
        let len = file
            .metadata()
            .map_err(io("cannot stat segment", &path))?
            .len();
        if len > offset {
            tracing::warn!(
                segment,
                discarded = len - offset,
                "truncating bytes of an append that was never acknowledged"
            );
        }
        if len != offset {
            file.set_len(offset)
                .map_err(io("cannot truncate segment", &path))?;
            file.sync_all().map_err(io("cannot sync segment", &path))?;
        }
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            segment,
            file,
            offset,
        })
    }

    /// Appends `bytes` (one or more whole chunks) and returns where they start. Not durable
    /// until [`SegmentWriter::sync`].
    pub fn append(&mut self, bytes: &[u8]) -> Result<(u32, u64), LogError> {
        if self.offset > 0 && self.offset + bytes.len() as u64 > SEGMENT_BYTES {
            self.roll()?;
        }
        let at = self.offset;
        self.file.write_all_at(bytes, at).map_err(io(
            "cannot write segment",
            &segment_path(&self.dir, self.segment),
        ))?;
        self.offset += bytes.len() as u64;
        Ok((self.segment, at))
    }

    /// Cuts the current segment back to `offset` after a failed group, so its bytes cannot
    /// be recovered as if they had been committed.
    pub fn rollback(&mut self, segment: u32, offset: u64) -> Result<(), LogError> {
        if segment != self.segment || offset > self.offset {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.segment);
        self.file
            .set_len(offset)
            .and_then(|_| self.file.sync_all())
            .map_err(io("cannot truncate segment", &path))?;
        self.offset = offset;
        Ok(())
    }

    /// Makes every appended byte durable (fdatasync).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io(
            "cannot fdatasync segment",
            &segment_path(&self.dir, self.segment),
        ))
    }

    fn roll(&mut self) -> Result<(), LogError> {
        self.sync()?;
        let next = self.segment + 1;
        let path = segment_path(&self.dir, next);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io("cannot create segment", &path))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.segment = next;
        self.offset = 0;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))
}

/// Walks the chunks stored from `from` (segment, offset) on, across later segments, calling
/// `f` with each complete chunk (location and bytes, header included) until `f` returns
/// `false` or a chunk is missing, short or fails its CRC. Returns where the last accepted
/// chunk ends: where writing must continue.
pub(super) fn scan(
    dir: &Path,
    from: (u32, u64),
    mut f: impl FnMut(ChunkLocation, &[u8]) -> Result<bool, LogError>,
) -> Result<(u32, u64), LogError> {
    use super::codec::{CHUNK_HEADER, chunk_header};
    let mut end = from;
    let (mut segment, mut offset) = from;
    loop {
        let path = segment_path(dir, segment);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(end),
            Err(e) => return Err(io("cannot open segment", &path)(e)),
        };
        let len = file
            .metadata()
            .map_err(io("cannot stat segment", &path))?
            .len();
        loop {
            let mut header = [0u8; CHUNK_HEADER];
            if offset + CHUNK_HEADER as u64 > len
                || file.read_exact_at(&mut header, offset).is_err()
            {
                break;
            }
            let Some(h) = chunk_header(&header) else {
                break;
            };
            let total = CHUNK_HEADER as u64 + u64::from(h.body_len);
            if h.body_len == 0 || offset + total > len {
                return Ok(end);
            }
            let mut bytes = vec![0u8; total as usize];
            file.read_exact_at(&mut bytes, offset)
                .map_err(io("cannot read segment", &path))?;
            if crc32fast::hash(&bytes[CHUNK_HEADER..]) != h.crc {
                return Ok(end);
            }
            let loc = ChunkLocation {
                segment,
                offset,
                len: total as u32,
            };
            if !f(loc, &bytes)? {
                return Ok(end);
            }
            offset += total;
            end = (segment, offset);
        }
        if offset != len {
            // A torn chunk at the end of this segment: nothing after it was acknowledged.
            return Ok(end);
        }
        segment += 1;
        offset = 0;
    }
}

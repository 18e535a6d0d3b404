//! Append-only segment files holding the log's event chunks.
//!
//! Events live in files of our own (`events/NNNNNNNN.seg`), written sequentially and synced
//! with `fdatasync`; sled keeps only a small index entry per chunk. The segments are the
//! log's write-ahead record: an append is acknowledged once its chunks are synced here, and
//! at start-up chunks past the last indexed one are checked (length, CRC, position) and
//! indexed again. Bytes after the last complete chunk are truncated only when nothing valid
//! follows them to the end of the last segment (a write cut short by a crash, never
//! acknowledged); bad bytes with valid chunks after them are [`Damage`], which the log
//! refuses to open over (see `repair`).
//!
//! The segment being written is preallocated ahead of the writes, [`PREALLOCATE_BYTES`] at
//! a time, so that an append's `fdatasync` has data to write and no file size: the space
//! past the last chunk reads as zeros, which recovery tells from a torn write (a torn
//! write leaves bytes that are not all zeros). A segment is cut to its data when the next
//! one starts.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::LogError;
use super::codec::{CHUNK_HEADER, ChunkHeader, ChunkLocation, chunk_header};

/// A segment is closed and a new one started past this size, unless configured otherwise.
pub(super) const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// How far ahead of the writes the current segment is allocated: the file's size changes
/// (and an `fdatasync` must write it) once per this many bytes instead of at every append.
pub(super) const PREALLOCATE_BYTES: u64 = 16 * 1024 * 1024;

/// True when every byte of `file` from `from` to `len` is zero: preallocated space, not a
/// write.
pub(super) fn zeros_from(file: &File, from: u64, len: u64) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = from;
    while at < len {
        let n = ((len - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// True when segment `n` of `dir`, `len` bytes long, holds anything but zeros (a file
/// preallocated by a writer that stopped before writing to it holds nothing).
fn has_data(dir: &Path, n: u32, len: u64) -> Result<bool, LogError> {
    if len == 0 {
        return Ok(false);
    }
    let path = segment_path(dir, n);
    let file = File::open(&path).map_err(io("cannot open segment", &path))?;
    Ok(!zeros_from(&file, 0, len).map_err(io("cannot read segment", &path))?)
}

/// Allocates `file` up to `len` bytes (zeros past its data). `Ok(false)` when the file
/// system cannot preallocate: the writes then grow the file.
fn preallocate(file: &File, from: u64, len: u64) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let (Ok(offset), Ok(size)) = (
        libc::off_t::try_from(from),
        libc::off_t::try_from(len - from),
    ) else {
        return Ok(false);
    };
    // SAFETY: a valid open descriptor and a non-negative range.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, size) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let msg = format!("{what} {}", path.display());
    move |e| LogError::Storage(format!("{msg}: {e}"))
}

/// The file of segment number `segment` in `dir`.
pub(super) fn path(dir: &Path, segment: u32) -> PathBuf {
    segment_path(dir, segment)
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:08}.seg"))
}

/// Reads chunks from any segment; cheap to share between threads.
#[derive(Clone)]
pub(super) struct SegmentReader {
    dir: PathBuf,
    files: Arc<RwLock<HashMap<u32, Arc<File>>>>,
    /// Held shared by every chunk read and exclusively while chunks are overwritten in
    /// place (an erasure), so no read sees a chunk half rewritten.
    rewrite: Arc<RwLock<()>>,
}

impl SegmentReader {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: Arc::default(),
            rewrite: Arc::default(),
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

    /// The file of segment number `segment`.
    pub(super) fn path(&self, segment: u32) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    /// The bytes of the chunk at `loc`.
    pub(super) fn read(&self, loc: ChunkLocation) -> Result<Vec<u8>, LogError> {
        let _reading = self.reading();
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

    /// Holds off in-place rewrites while the caller reads chunk bytes by other means.
    pub(super) fn reading(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.rewrite.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Overwrites chunks in place with bytes of the same length (`(location, bytes)`), with
    /// every read held off meanwhile, and syncs each file written.
    pub(super) fn overwrite(&self, patches: &[(ChunkLocation, Vec<u8>)]) -> Result<(), LogError> {
        let _writing = self.rewrite.write().unwrap_or_else(|e| e.into_inner());
        let mut files: HashMap<u32, File> = HashMap::new();
        for (loc, bytes) in patches {
            assert_eq!(
                bytes.len(),
                loc.len as usize,
                "an in-place rewrite keeps the length"
            );
            let path = segment_path(&self.dir, loc.segment);
            if !files.contains_key(&loc.segment) {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io("cannot open segment for a rewrite", &path))?;
                files.insert(loc.segment, f);
            }
            files[&loc.segment]
                .write_all_at(bytes, loc.offset)
                .map_err(io("cannot rewrite a chunk of segment", &path))?;
        }
        for (segment, f) in &files {
            f.sync_data().map_err(io(
                "cannot sync segment",
                &segment_path(&self.dir, *segment),
            ))?;
        }
        Ok(())
    }
}

/// Appends chunks to the current segment; owned by the log's writer thread.
pub(super) struct SegmentWriter {
    dir: PathBuf,
    segment: u32,
    file: File,
    offset: u64,
    /// The current segment's size on disk: its data up to `offset`, zeros after.
    allocated: u64,
    /// False once the file system said it cannot preallocate.
    preallocating: bool,
    /// Size past which the next append starts a new segment.
    max_bytes: u64,
    /// The next segment's file, created ahead of time so that starting it never needs a
    /// new file descriptor at the moment a group is written.
    next: Option<File>,
}

impl SegmentWriter {
    /// Opens the segment directory so that writing continues at `end` (segment, offset),
    /// just after the last complete group. Bytes past `end` in its segment, and later
    /// segment files that are empty or are `torn` (the segment where [`scan`] found a torn
    /// tail), are discarded; any other later file with bytes in it is refused.
    pub(super) fn open(
        dir: &Path,
        end: (u32, u64),
        max_bytes: u64,
        torn: Option<u32>,
    ) -> Result<Self, LogError> {
        fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let (segment, offset) = end;
        let path = segment_path(dir, segment);
        let later: Vec<(u32, u64)> = list(dir)?
            .into_iter()
            .filter(|(n, _)| *n > segment)
            .collect();
        // Everything is checked before anything is removed.
        for &(n, len) in &later {
            if Some(n) != torn && has_data(dir, n, len)? {
                return Err(LogError::Corrupt(format!(
                    "segment {n:08}.seg holds {len} bytes after the log's end (segment {segment:08}.seg, byte {offset}); restore the segments from a backup, or run `evhost log repair`"
                )));
            }
        }
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
        if len < offset {
            return Err(LogError::Corrupt(format!(
                "segment {segment:08}.seg is {len} bytes long but its chunks end at byte {offset}; restore it from a backup or run `evhost log repair`"
            )));
        }
        for (n, len) in later {
            let p = segment_path(dir, n);
            let written = Some(n) == torn || has_data(dir, n, len)?;
            fs::remove_file(&p).map_err(io("cannot remove uncommitted segment", &p))?;
            if written {
                tracing::warn!(
                    segment = n,
                    bytes = len,
                    "removed a segment holding only a write cut short by a crash (never acknowledged)"
                );
            }
        }
        let mut allocated = len;
        // Zeros past the data are the space preallocated for it; anything else is a write
        // cut short.
        let preallocated =
            zeros_from(&file, offset, len).map_err(io("cannot read segment", &path))?;
        if len > offset && !preallocated {
            tracing::warn!(
                segment,
                discarded = len - offset,
                "truncating a write cut short by a crash (never acknowledged)"
            );
            file.set_len(offset)
                .map_err(io("cannot truncate segment", &path))?;
            file.sync_all().map_err(io("cannot sync segment", &path))?;
            allocated = offset;
        }
        sync_dir(dir)?;
        let mut w = Self {
            dir: dir.to_owned(),
            segment,
            file,
            offset,
            allocated,
            preallocating: true,
            max_bytes,
            next: None,
        };
        w.prepare_next();
        Ok(w)
    }

    /// Creates the next segment's file now, if it is not there yet; a failure (say, no file
    /// descriptor left) is retried at the next roll.
    fn prepare_next(&mut self) {
        if self.next.is_some() {
            return;
        }
        let path = segment_path(&self.dir, self.segment + 1);
        match OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
        {
            // Its directory entry is made durable now too, so that starting it later needs
            // no descriptor at all.
            Ok(f) => match sync_dir(&self.dir) {
                Ok(()) => self.next = Some(f),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot sync the segment directory ahead of time; will retry")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot create the next segment ahead of time; will retry")
            }
        }
    }

    /// Where the next append goes: (segment, offset).
    pub(super) fn position(&self) -> (u32, u64) {
        (self.segment, self.offset)
    }

    /// Appends `bytes` (one or more whole chunks) and returns where they start. Not durable
    /// until [`SegmentWriter::sync`].
    pub(super) fn append(&mut self, bytes: &[u8]) -> Result<(u32, u64), LogError> {
        if self.offset > 0 && self.offset + bytes.len() as u64 > self.max_bytes {
            self.roll()?;
        }
        let at = self.offset;
        let end = at + bytes.len() as u64;
        if self.preallocating && end > self.allocated {
            let to = (self.allocated + PREALLOCATE_BYTES)
                .min(self.max_bytes)
                .max(end);
            match preallocate(&self.file, self.allocated, to) {
                Ok(true) => self.allocated = to,
                Ok(false) => self.preallocating = false,
                Err(e) => {
                    // Short of space for the step ahead (a nearly full disk or a quota):
                    // this segment grows with its writes instead, and the write itself
                    // says whether there is room for the group.
                    tracing::warn!(error = %e, segment = self.segment, "cannot allocate segment space ahead of the writes; writing without it");
                    self.preallocating = false;
                }
            }
        }
        self.file.write_all_at(bytes, at).map_err(io(
            "cannot write segment",
            &segment_path(&self.dir, self.segment),
        ))?;
        self.offset += bytes.len() as u64;
        Ok((self.segment, at))
    }

    /// Takes back every byte written since the writer was at `start` (segment, offset), after
    /// a group failed, so those bytes cannot be recovered as if they had been committed. An
    /// error here leaves the group's outcome unknown.
    pub(super) fn discard_since(&mut self, start: (u32, u64)) -> Result<(), LogError> {
        let offset = if start.0 == self.segment { start.1 } else { 0 };
        let path = segment_path(&self.dir, self.segment);
        self.file
            .set_len(offset)
            .and_then(|_| self.file.sync_all())
            .map_err(io("cannot truncate segment", &path))?;
        self.offset = offset;
        self.allocated = offset;
        Ok(())
    }

    /// Makes every appended byte durable (fdatasync).
    pub(super) fn sync(&mut self) -> Result<(), LogError> {
        self.file.sync_data().map_err(io(
            "cannot fdatasync segment",
            &segment_path(&self.dir, self.segment),
        ))
    }

    /// Cuts the segment to its data, durably: a finished segment, and the current one when
    /// the log closes, hold nothing after their last chunk.
    pub(super) fn cut_to_data(&mut self) -> Result<(), LogError> {
        if self.allocated > self.offset {
            let path = segment_path(&self.dir, self.segment);
            self.file
                .set_len(self.offset)
                .and_then(|_| self.file.sync_all())
                .map_err(io("cannot cut segment to its data", &path))?;
            self.allocated = self.offset;
        }
        Ok(())
    }

    fn roll(&mut self) -> Result<(), LogError> {
        self.sync()?;
        self.cut_to_data()?;
        self.prepare_next();
        let next = self.segment + 1;
        let Some(file) = self.next.take() else {
            return Err(LogError::Storage(format!(
                "cannot create segment {}: see the earlier warning; the append can be retried",
                segment_path(&self.dir, next).display()
            )));
        };
        self.file = file;
        self.segment = next;
        self.offset = 0;
        self.allocated = 0;
        self.preallocating = true;
        self.prepare_next();
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync directory", dir))
}

/// Bytes of the segments that are not the chunk the log expects there, followed by valid
/// chunks: damage (a flipped bit, a lost or overwritten range), never a write cut short,
/// because at most the last group of the last segment is ever unsynced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file holding the damaged bytes.
    pub segment: u32,
    /// Byte offset in that segment where the damaged bytes start.
    pub offset: u64,
    /// Where valid chunks start again (segment, offset), when any do.
    pub resume: Option<(u32, u64)>,
    /// First position the damaged bytes held (the one the log expected there).
    pub first_position: u64,
    /// First position after the damage that is readable (the chunk at `resume`).
    pub resume_position: Option<u64>,
    /// Bytes of valid chunks found after the damage (a lower bound of what was written).
    pub valid_bytes_after: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "segment {:08}.seg is damaged at byte offset {}",
            self.segment, self.offset
        )?;
        match (self.resume, self.resume_position) {
            (Some((seg, off)), Some(pos)) => {
                let positions = if pos > self.first_position {
                    format!("positions {}..={}", self.first_position, pos - 1)
                } else {
                    format!("no whole position (before {})", self.first_position)
                };
                write!(
                    f,
                    ": {positions} cannot be read, and valid events follow (from position {pos}, at offset {off} of segment {seg:08}.seg, at least {} bytes)",
                    self.valid_bytes_after
                )
            }
            _ => write!(
                f,
                ": events from position {} cannot be read, and later segment files hold bytes that are not valid chunks",
                self.first_position
            ),
        }
    }
}

/// How a walk over the segments ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ScanEnd {
    /// Every byte was a valid chunk, up to the end of the last segment.
    Clean,
    /// Bytes that are not a valid chunk start at (segment, offset) and nothing valid comes
    /// after them in the last segment: a write cut short by a crash, never acknowledged.
    Torn { segment: u32, offset: u64 },
    /// Damage with valid chunks (or other segments' bytes) after it.
    Damaged(Damage),
}

/// Segment numbers present in `dir`, in order, with their lengths.
pub(super) fn list(dir: &Path) -> Result<Vec<(u32, u64)>, LogError> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("cannot list", dir)(e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(n) = n {
            let len = entry
                .metadata()
                .map_err(io("cannot stat segment", &entry.path()))?
                .len();
            out.push((n, len));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Walks the chunks stored from `from` (segment, offset) on, across the later segment files
/// that exist, calling `f` with each valid chunk (location, header, bytes with the header)
/// in position order, starting at position `expected`. Stops at the first bytes that are
/// not the chunk expected there and says whether they are a torn tail or damage.
pub(super) fn scan(
    dir: &Path,
    from: (u32, u64),
    mut expected: u64,
    mut f: impl FnMut(ChunkLocation, &ChunkHeader, &[u8]) -> Result<(), LogError>,
) -> Result<ScanEnd, LogError> {
    let segments = list(dir)?;
    // Empty files past the data (a segment opened ahead of time) hold nothing.
    let mut last_nonempty = None;
    for &(n, len) in segments.iter().rev() {
        if n < from.0 {
            break;
        }
        if has_data(dir, n, len)? {
            last_nonempty = Some(n);
            break;
        }
    }
    let mut offset = from.1;
    if offset > 0 && !segments.iter().any(|(n, _)| *n == from.0) {
        return Err(LogError::Corrupt(format!(
            "segment {:08}.seg, which the index has chunks in, is missing; restore it from a backup, or run `evhost log repair` to re-index what is left",
            from.0
        )));
    }
    // Segment numbers may have gaps (repair can leave them); positions must not.
    for &(segment, len) in segments.iter().filter(|(n, _)| *n >= from.0) {
        if segment > from.0 {
            offset = 0;
        }
        let path = segment_path(dir, segment);
        if offset > len {
            return Err(LogError::Corrupt(format!(
                "segment {segment:08}.seg is {len} bytes long, but the index has chunks up to byte {offset}: the file was cut short after it was written, and the events past byte {len} are gone; restore it from a backup, or run `evhost log repair` to re-index what is left"
            )));
        }
        let file = File::open(&path).map_err(io("cannot open segment", &path))?;
        while offset < len {
            let chunk = read_chunk(&file, offset, len)?;
            let Some((h, bytes)) = chunk.filter(|(h, _)| h.first_position == expected) else {
                // Preallocated space after the segment's data: the next chunk, if any, is
                // in the next segment (and must carry the next position).
                if zeros_from(&file, offset, len).map_err(io("cannot read segment", &path))? {
                    break;
                }
                return classify(dir, &segments, last_nonempty, segment, offset, expected);
            };
            let loc = ChunkLocation {
                segment,
                offset,
                len: bytes.len() as u32,
            };
            f(loc, &h, &bytes)?;
            expected = h.first_position + u64::from(chunk_count(&bytes));
            offset += bytes.len() as u64;
        }
    }
    Ok(ScanEnd::Clean)
}

/// Reads the chunk at `offset` when its header is whole, its body well formed and its CRC
/// matches.
fn read_chunk(
    file: &File,
    offset: u64,
    len: u64,
) -> Result<Option<(ChunkHeader, Vec<u8>)>, LogError> {
    let mut header = [0u8; CHUNK_HEADER];
    if offset + CHUNK_HEADER as u64 > len || file.read_exact_at(&mut header, offset).is_err() {
        return Ok(None);
    }
    let Some(h) = chunk_header(&header) else {
        return Ok(None);
    };
    let total = CHUNK_HEADER as u64 + u64::from(h.body_len);
    if h.body_len < 4 || offset + total > len {
        return Ok(None);
    }
    let mut bytes = vec![0u8; total as usize];
    if file.read_exact_at(&mut bytes, offset).is_err()
        || !well_formed(&bytes[CHUNK_HEADER..])
        || crc32fast::hash(&bytes[CHUNK_HEADER..]) != h.crc
    {
        return Ok(None);
    }
    Ok(Some((h, bytes)))
}

/// True when a chunk body's offset table fits it and ends exactly at its end (checked before
/// the CRC, so that random bytes rarely cost one).
fn well_formed(body: &[u8]) -> bool {
    let Some(count) = body
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
    else {
        return false;
    };
    let table = 4 + 4 * count as usize;
    if count == 0 || table > body.len() {
        return false;
    }
    let mut last = 0u32;
    for i in 0..count as usize {
        let end = u32::from_le_bytes(body[4 + 4 * i..8 + 4 * i].try_into().expect("4"));
        if end < last {
            return false;
        }
        last = end;
    }
    last as usize == body.len() - table
}

/// Events in a chunk whose CRC was checked.
fn chunk_count(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(
        bytes[CHUNK_HEADER..CHUNK_HEADER + 4]
            .try_into()
            .expect("4 bytes"),
    )
}

/// Decides what bytes that are not the expected chunk at (segment, offset) are: a torn
/// tail when nothing valid follows them to the end of the last segment, damage otherwise.
fn classify(
    dir: &Path,
    segments: &[(u32, u64)],
    last_nonempty: Option<u32>,
    segment: u32,
    offset: u64,
    expected: u64,
) -> Result<ScanEnd, LogError> {
    if let Some((seg, off, pos, after)) = find_valid(dir, segments, segment, offset, expected)? {
        return Ok(ScanEnd::Damaged(Damage {
            segment,
            offset,
            resume: Some((seg, off)),
            first_position: expected,
            resume_position: Some(pos),
            valid_bytes_after: after,
        }));
    }
    if last_nonempty.is_some_and(|last| last > segment) {
        return Ok(ScanEnd::Damaged(Damage {
            segment,
            offset,
            resume: None,
            first_position: expected,
            resume_position: None,
            valid_bytes_after: 0,
        }));
    }
    Ok(ScanEnd::Torn { segment, offset })
}

/// The valid chunk at (segment, offset) or after it in this or a later segment that the
/// log can go on from: its first position is at least `expected` (and plausibly close),
/// and it is followed by the next chunk in position order or by the end of the data. A
/// chunk at `offset` itself (a header naming the wrong position) needs such a follower.
/// Returns where it is, its first position, and how many bytes of valid chunks run on.
fn find_valid(
    dir: &Path,
    segments: &[(u32, u64)],
    segment: u32,
    offset: u64,
    expected: u64,
) -> Result<Option<(u32, u64, u64, u64)>, LogError> {
    for &(seg, len) in segments.iter().filter(|(n, _)| *n >= segment) {
        let path = segment_path(dir, seg);
        let start = if seg == segment { offset } else { 0 };
        if start >= len {
            continue;
        }
        // Only the part after the bad bytes is read.
        let file = File::open(&path).map_err(io("cannot open segment", &path))?;
        let mut bytes = vec![0u8; (len - start) as usize];
        file.read_exact_at(&mut bytes, start)
            .map_err(io("cannot read segment", &path))?;
        let valid_at = |o: usize| -> Option<(ChunkHeader, usize)> {
            let h = chunk_header(bytes.get(o..)?)?;
            let end = o.checked_add(CHUNK_HEADER + h.body_len as usize)?;
            let body = bytes.get(o + CHUNK_HEADER..end)?;
            (h.body_len >= 4 && well_formed(body) && crc32fast::hash(body) == h.crc)
                .then_some((h, end))
        };
        for o in 0..bytes.len().saturating_sub(CHUNK_HEADER) {
            let Some(h) = chunk_header(&bytes[o..]) else {
                continue;
            };
            // Random bytes almost never carry a first position this close to the expected
            // one, which keeps the checks below rare.
            if h.first_position < expected || h.first_position - expected > u64::from(u32::MAX) {
                continue;
            }
            let Some((h, end)) = valid_at(o) else {
                continue;
            };
            // How far valid chunks in position order run on from here, in this segment.
            let mut run = end;
            let mut next_position = h.first_position + u64::from(chunk_count(&bytes[o..]));
            let mut followers = 0;
            while let Some((n, e)) = valid_at(run) {
                if n.first_position != next_position {
                    break;
                }
                next_position += u64::from(chunk_count(&bytes[run..]));
                run = e;
                followers += 1;
            }
            // The data ends where only the zeros of preallocated space follow.
            let at_data_end = bytes[run..].iter().all(|b| *b == 0);
            let confirmed = followers > 0 || (at_data_end && (o > 0 || seg != segment));
            if !confirmed {
                continue;
            }
            return Ok(Some((
                seg,
                start + o as u64,
                h.first_position,
                (run - o) as u64,
            )));
        }
    }
    Ok(None)
}

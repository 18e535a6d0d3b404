//! What a plugin writes to stdout and stderr, and the lines it sends through the `log`
//! import, kept per plugin in a bounded buffer of recent lines. A full buffer drops its
//! oldest lines and counts them (the count is shown with every read); a plugin's writes
//! never fail and never block because of it.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use serde::Serialize;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Bytes of lines a plugin's buffer holds; older lines are dropped (and counted) past it.
pub const LOG_BUFFER_BYTES: usize = 256 * 1024;

/// Longest line kept, in bytes; a longer one is cut, with a marker saying so.
pub const MAX_LINE_BYTES: usize = 4096;

/// One line a plugin wrote.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Its number, from 1, in the order the plugin wrote: what `after` takes.
    pub seq: u64,
    /// When the host received it.
    pub at: DateTime<Utc>,
    /// `stdout`, `stderr`, or the level of a `log` import line (`info`, `error`, ...).
    pub source: &'static str,
    /// The text, without its newline.
    pub line: String,
}

/// What a read of a plugin's log gives.
#[derive(Debug, Clone, Serialize)]
pub struct LogPage {
    /// The lines after the one asked for, oldest first.
    pub lines: Vec<LogLine>,
    /// The `seq` to ask after next time (the last line's, or the one asked for).
    pub next: u64,
    /// Lines dropped from the buffer since the plugin was loaded, to keep it bounded.
    pub dropped: u64,
}

#[derive(Default)]
struct Buffer {
    lines: VecDeque<LogLine>,
    bytes: usize,
    next_seq: u64,
    dropped: u64,
    /// An unfinished line per stream (stdout, stderr).
    partial: [Vec<u8>; 2],
}

/// A plugin's recent log lines; cheap to clone (clones share the buffer).
#[derive(Clone, Default)]
pub struct PluginLogs(Arc<Mutex<Buffer>>);

impl PluginLogs {
    /// Records a whole line from `source`.
    pub fn push(&self, source: &'static str, line: &str) {
        let mut b = self.0.lock().expect("plugin log lock");
        b.push(source, line);
    }

    /// Up to `limit` lines after `after`, and where to read on.
    pub fn read(&self, after: u64, limit: usize) -> LogPage {
        let b = self.0.lock().expect("plugin log lock");
        let lines: Vec<LogLine> = b
            .lines
            .iter()
            .filter(|l| l.seq > after)
            .take(limit)
            .cloned()
            .collect();
        LogPage {
            next: lines.last().map_or(after, |l| l.seq),
            lines,
            dropped: b.dropped,
        }
    }

    /// The stream a store's stdout (`stderr` false) or stderr writes to.
    pub(super) fn stream(&self, stderr: bool) -> LogStream {
        LogStream {
            logs: self.clone(),
            stderr,
        }
    }
}

impl Buffer {
    fn push(&mut self, source: &'static str, line: &str) {
        let text = crate::limits::bound(line.to_owned(), MAX_LINE_BYTES);
        self.next_seq += 1;
        self.bytes += text.len();
        self.lines.push_back(LogLine {
            seq: self.next_seq,
            at: Utc::now(),
            source,
            line: text,
        });
        while self.bytes > LOG_BUFFER_BYTES {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.line.len();
            self.dropped += 1;
        }
    }

    /// Takes bytes a plugin wrote to one of its streams: each complete line is recorded; an
    /// unfinished one waits for its end (or is recorded once it reaches the line limit).
    fn write(&mut self, stderr: bool, bytes: &[u8]) {
        let source = if stderr { "stderr" } else { "stdout" };
        let slot = usize::from(stderr);
        for piece in bytes.split_inclusive(|b| *b == b'\n') {
            let mut partial = std::mem::take(&mut self.partial[slot]);
            partial.extend_from_slice(piece);
            if partial.last() == Some(&b'\n') {
                partial.pop();
                if partial.last() == Some(&b'\r') {
                    partial.pop();
                }
                self.push(source, &String::from_utf8_lossy(&partial));
            } else if partial.len() >= MAX_LINE_BYTES {
                self.push(source, &String::from_utf8_lossy(&partial));
            } else {
                self.partial[slot] = partial;
            }
        }
    }
}

/// A plugin's stdout or stderr: every write is taken whole.
#[derive(Clone)]
pub(super) struct LogStream {
    logs: PluginLogs,
    stderr: bool,
}

impl LogStream {
    fn take(&self, bytes: &[u8]) {
        self.logs
            .0
            .lock()
            .expect("plugin log lock")
            .write(self.stderr, bytes);
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always room: the buffer makes room by dropping old lines.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_kept_in_order_and_bounded() {
        let logs = PluginLogs::default();
        let out = logs.stream(false);
        out.take(b"one\ntw");
        out.take(b"o\r\nthree");
        logs.push("info", "from the log import");
        let page = logs.read(0, 10);
        let lines: Vec<_> = page
            .lines
            .iter()
            .map(|l| (l.source, l.line.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                ("stdout", "one"),
                ("stdout", "two"),
                ("info", "from the log import")
            ]
        );
        assert_eq!(logs.read(page.next, 10).lines.len(), 0);

        // Far past the bound: the oldest go, counted; a write never fails.
        let line = "x".repeat(1000);
        for _ in 0..1000 {
            out.take(format!("{line}\n").as_bytes());
        }
        let page = logs.read(0, usize::MAX);
        assert!(page.dropped > 0);
        let kept: usize = page.lines.iter().map(|l| l.line.len()).sum();
        assert!(kept <= LOG_BUFFER_BYTES, "{kept}");
        assert_eq!(page.lines.last().unwrap().seq, 3 + 1000);

        // A line without its end, past the line limit, is kept cut.
        out.take("y".repeat(3 * MAX_LINE_BYTES).as_bytes());
        let last = logs.read(0, usize::MAX).lines.pop().unwrap();
        assert!(last.line.len() <= MAX_LINE_BYTES, "{}", last.line.len());
    }
}

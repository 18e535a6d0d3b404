//! The lone writer: one client on one keep-alive HTTP connection appending serially and
//! waiting for each acknowledgement, as a command handler that saves one event at a time
//! does. Measured side by side, in one run, with what the disk itself allows:
//!
//! - the disk: one 200-byte `pwrite` + `fdatasync`, into a file that grows with every write
//!   and into a preallocated one (the physical limit of a lone writer);
//! - evhost over HTTP: one event per append, and 100 events per append, with no plugin and
//!   with assistant-stats loaded; the host's CPU time (user + system) per append, and the
//!   sync calls per append counted with strace (when strace is installed);
//! - batches of 1,000 events from one client over HTTP against the in-process log's own
//!   figure for batches of 1,000 (`SledLog::append`, no HTTP);
//! - the host's RSS with assistant-stats loaded after 100k events (and after 1M with
//!   `EVHOST_BENCH_EVENTS=1000000`).
//!
//! Run: `cargo bench -p evhost-tests --bench lone_writer`. `EVHOST_BENCH_APPENDS` sets the
//! number of serial appends per figure (default 2,000); `EVHOST_BENCH_BIN` runs another
//! build of the host binary (to compare two builds side by side); `EVHOST_BENCH_ARGS`
//! adds arguments to `evhost serve` (e.g. `--cache-mb 16`).

use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evhost::{
    EventLog, EventType, ExpectedVersion, Hub, NewEvent, Payload, SledLog, SledLogConfig,
    StreamAppend,
};
use evhost_tests::{Host, caught_up, load_ok, sample_payload as payload};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_evhost-e2e");
const PLUGINS: &str = env!("EVHOST_TEST_PLUGINS");

fn events(from: u64, n: u64) -> Value {
    Value::Array(
        (from..from + n)
            .map(|i| json!({"type": "assistant.tool.executed", "payload": payload(i)}))
            .collect(),
    )
}

/// Microseconds per `pwrite` of 200 bytes + `fdatasync`, `n` times, into a new file in
/// `dir`: growing with each write, or preallocated first.
fn disk(dir: &Path, n: u64, preallocate: bool) -> f64 {
    let path = dir.join(if preallocate { "prealloc" } else { "growing" });
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    if preallocate {
        let len = (n * 200 + (1 << 20)) as libc::off_t;
        // SAFETY: a valid open descriptor and a non-negative range.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    }
    f.sync_all().unwrap();
    let buf = [b'x'; 200];
    let start = Instant::now();
    for i in 0..n {
        f.write_all_at(&buf, i * 200).unwrap();
        f.sync_data().unwrap();
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(f);
    std::fs::remove_file(&path).unwrap();
    us
}

/// Microseconds per round trip of 300 bytes over loopback TCP between two threads (no
/// delay): what any request and its answer cost on this machine before HTTP and the disk.
fn tcp_round_trip(n: u64) -> f64 {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 300];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf).unwrap();
        }
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut buf = [7u8; 300];
    let start = Instant::now();
    for _ in 0..n {
        c.write_all(&buf).unwrap();
        c.read_exact(&mut buf).unwrap();
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(c);
    echo.join().unwrap();
    us
}

/// User + system CPU time of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Resident and peak resident memory of process `pid`, in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One client appending serially.
struct Client {
    http: reqwest::Client,
    url: String,
    next: u64,
}

impl Client {
    fn new(host: &Host) -> Self {
        Self {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap(),
            url: format!("{}/v1/streams/lone-{}", host.url, host.pid()),
            next: 0,
        }
    }

    async fn append(&mut self, n: u64) {
        let body = json!({ "events": events(self.next, n) });
        self.next += n;
        let r = self.http.post(&self.url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        r.bytes().await.unwrap();
    }

    /// Microseconds per `GET /health` on this client's connection: HTTP's own round trip.
    async fn health(&self, host: &Host, count: u64) -> f64 {
        let url = format!("{}/health", host.url);
        let start = Instant::now();
        for _ in 0..count {
            let r = self.http.get(&url).send().await.unwrap();
            r.bytes().await.unwrap();
        }
        start.elapsed().as_secs_f64() * 1e6 / count as f64
    }

    /// `count` appends of `size` events, one at a time: mean and p99 microseconds per
    /// append, and the host's CPU milliseconds per append.
    async fn serial(&mut self, host: &Host, count: u64, size: u64) -> (f64, f64, f64) {
        let mut times = Vec::with_capacity(count as usize);
        let cpu = cpu_seconds(host.pid());
        let start = Instant::now();
        for _ in 0..count {
            let t = Instant::now();
            self.append(size).await;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let total = start.elapsed().as_secs_f64();
        let cpu = cpu_seconds(host.pid()) - cpu;
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
        (total * 1e6 / count as f64, p99, cpu * 1e3 / count as f64)
    }
}

/// Sync calls per append: strace attached to every thread of the host for `count` serial
/// one-event appends. `None` when strace is not installed.
async fn syncs_per_append(host: &Host, client: &mut Client, count: u64) -> Option<String> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-c",
        "-e",
        "trace=fsync,fdatasync,sync_file_range,msync",
    ])
    .arg("-o")
    .arg(out.path());
    for task in std::fs::read_dir(format!("/proc/{}/task", host.pid())).ok()? {
        cmd.arg("-p").arg(task.ok()?.file_name());
    }
    let mut strace = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..count {
        client.append(1).await;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    strace.wait().ok()?;
    let mut counts = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(out.path()).ok()?).lines() {
        let line = line.ok()?;
        let cols: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() && !line.contains("total") {
            let name = cols[cols.len() - 1];
            let calls: f64 = cols[3].parse().ok()?;
            let seconds: f64 = cols[1].parse().ok()?;
            counts.push(format!(
                "{name} {:.2}/append ({:.0} us each)",
                calls / count as f64,
                seconds * 1e6 / calls
            ));
        }
    }
    Some(if counts.is_empty() {
        "no sync calls".into()
    } else {
        counts.join(", ")
    })
}

/// Events per second of the in-process log for `batches` appends of 1,000 events.
async fn in_process_batches(dir: &Path, batches: u64) -> f64 {
    let log = Arc::new(SledLog::open(SledLogConfig::new(dir), Hub::new(10_000)).unwrap());
    let mut timed = Duration::ZERO;
    for b in 0..batches {
        let events = (0..1000)
            .map(|i| {
                NewEvent::new(
                    EventType::new("assistant.tool.executed").unwrap(),
                    Payload::from_json(&payload(b * 1000 + i).to_string()).unwrap(),
                )
            })
            .collect();
        let group = vec![StreamAppend {
            stream: "bulk".into(),
            expected: ExpectedVersion::Any,
            events,
        }];
        let start = Instant::now();
        log.append(group).await.unwrap();
        timed += start.elapsed();
    }
    (batches * 1000) as f64 / timed.as_secs_f64()
}

/// Microseconds per serial one-event append to the in-process log (no HTTP).
async fn in_process_serial(dir: &Path, count: u64) -> f64 {
    let log = Arc::new(SledLog::open(SledLogConfig::new(dir), Hub::new(10_000)).unwrap());
    let start = Instant::now();
    for i in 0..count {
        let group = vec![StreamAppend {
            stream: "lone".into(),
            expected: ExpectedVersion::Any,
            events: vec![NewEvent::new(
                EventType::new("assistant.tool.executed").unwrap(),
                Payload::from_json(&payload(i).to_string()).unwrap(),
            )],
        }];
        log.append(group).await.unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / count as f64
}

/// Events per second of one HTTP client appending batches of 1,000 serially.
async fn http_batches(client: &mut Client, batches: u64) -> f64 {
    let bodies: Vec<String> = (0..batches)
        .map(|b| json!({ "events": events(client.next + b * 1000, 1000) }).to_string())
        .collect();
    client.next += batches * 1000;
    let start = Instant::now();
    for body in bodies {
        let r = client
            .http
            .post(&client.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    (batches * 1000) as f64 / start.elapsed().as_secs_f64()
}

fn print(line: String) {
    println!("{line}");
    std::io::stdout().flush().unwrap();
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` builds and runs benches without `--bench`: nothing to do.
        return;
    }
    let appends: u64 = std::env::var("EVHOST_BENCH_APPENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let events_total: u64 = std::env::var("EVHOST_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let manifest =
        std::fs::read_to_string(Path::new(PLUGINS).join("assistant-stats.toml")).unwrap();
    let wasm = std::fs::read(Path::new(PLUGINS).join("assistant-stats.wasm")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let bin = std::env::var("EVHOST_BENCH_BIN").unwrap_or_else(|_| BIN.to_owned());
    let args = std::env::var("EVHOST_BENCH_ARGS").unwrap_or_default();
    let args: Vec<&str> = args.split_whitespace().collect();

    for plugin in [false, true] {
        let data = tempfile::tempdir().unwrap();
        let host = Host::start(&bin, data.path(), &args).await;
        let label = if plugin {
            "assistant-stats loaded"
        } else {
            "no plugin"
        };
        if plugin {
            load_ok(&host, "assistant-stats", &manifest, wasm.clone()).await;
        }
        let mut client = Client::new(&host);
        client.serial(&host, 200, 1).await; // warm the connection and the caches
        // The disk's limit, measured right before and after, and averaged.
        let growing = disk(scratch.path(), appends / 2, false);
        let before = disk(scratch.path(), appends / 2, true);
        let (one, one_p99, one_cpu) = client.serial(&host, appends, 1).await;
        let after = disk(scratch.path(), appends / 2, true);
        let limit = (before + after) / 2.0;
        let (hundred, hundred_p99, hundred_cpu) = client.serial(&host, appends / 4, 100).await;
        let tcp = tcp_round_trip(appends);
        let http = client.health(&host, appends).await;
        print(format!(
            "lone writer, {label}: disk write+fdatasync {limit:.0} us preallocated ({before:.0}, {after:.0}), {growing:.0} us growing"
        ));
        print(format!(
            "  round trips: loopback TCP {tcp:.0} us, HTTP GET /health {http:.0} us; disk + TCP = {:.0} us",
            limit + tcp
        ));
        print(format!(
            "  1 event per append:    {one:>7.0} us mean, p99 {one_p99:.0} us = {:.2}x the disk, {:.2}x disk + TCP; host CPU {one_cpu:.3} ms per append",
            one / limit,
            one / (limit + tcp)
        ));
        print(format!(
            "  100 events per append: {hundred:>7.0} us mean, p99 {hundred_p99:.0} us = {:.2}x the disk; host CPU {hundred_cpu:.3} ms per append",
            hundred / limit
        ));
        if let Some(syncs) = syncs_per_append(&host, &mut client, 300).await {
            print(format!("  sync calls (strace, 300 appends): {syncs}"));
        }
        if plugin {
            caught_up(&host, "assistant-stats").await;
            let (rss, peak) = rss_mb(host.pid());
            print(format!(
                "  RSS after {} events: {rss:.0} MB (peak {peak:.0} MB)",
                client.next
            ));
            while client.next < events_total {
                let n = (events_total - client.next).min(100_000) / 1000;
                http_batches(&mut client, n.max(1)).await;
            }
            caught_up(&host, "assistant-stats").await;
            let (rss, peak) = rss_mb(host.pid());
            print(format!(
                "  RSS after {} events, caught up: {rss:.0} MB (peak {peak:.0} MB)",
                client.next
            ));
        } else {
            let inproc_dir = tempfile::tempdir().unwrap();
            let serial = in_process_serial(inproc_dir.path(), appends).await;
            print(format!(
                "  in-process log, 1 event per append: {serial:.0} us mean = {:.2}x the disk",
                serial / limit
            ));
            let inproc_dir = tempfile::tempdir().unwrap();
            let inproc = in_process_batches(inproc_dir.path(), 200).await;
            let http = http_batches(&mut client, 200).await;
            print(format!(
                "  batches of 1000, one client: HTTP {http:.0} events/s, in-process log {inproc:.0} events/s = {:.2}x",
                http / inproc
            ));
        }
        drop(host);
    }
}

//! sandbox-probe: misbehaves on request, so the host's limits and sandbox can be tested.
//!
//! | event type      | what it does                                   |
//! |-----------------|------------------------------------------------|
//! | `probe.loop`    | loops forever                                  |
//! | `probe.alloc`   | allocates and touches 512 MiB                  |
//! | `probe.trap`    | panics                                         |
//! | `probe.print`   | prints to stdout and stderr, logs a line       |
//! | `probe.spam`    | prints 5,000 lines of ~100 bytes to stdout     |
//! | `probe.recurse` | recurses until the stack overflows             |
//! | `probe.env`     | reads `HOME` and the argument list             |
//! | `probe.file`    | reads `/etc/hostname` and lists `/`            |
//! | `probe.net`     | opens a TCP connection to 127.0.0.1:9          |
//! | `probe.clock`   | reads the wall clock (microseconds)            |
//! | `probe.random`  | reads a random u64                             |
//! | `probe.config`  | records its configuration (`config.entries`)   |
//! | anything else   | counts it                                      |

use std::borrow::Cow;
use std::collections::BTreeMap;

use evhost_sdk::{Error, Event, Projection};

/// What the probe observed, by event type.
pub struct Probe;

#[inline(never)]
#[allow(unconditional_recursion)] // recursing until the stack overflows is the point
fn recurse(n: u64, pad: &mut [u8; 256]) -> u64 {
    pad[(n % 256) as usize] = n as u8;
    let mut next = *pad;
    recurse(n + 1, &mut next) + u64::from(pad[0])
}

impl Projection for Probe {
    type State = BTreeMap<String, String>;

    fn key(_: &Event) -> Result<Cow<'static, str>, Error> {
        Ok(Cow::Borrowed("probe"))
    }

    fn apply(_: &str, seen: &mut Self::State, e: &Event) -> Result<(), Error> {
        match &*e.event_type {
            "probe.loop" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "probe.alloc" => {
                let v = vec![1u8; 512 << 20];
                seen.insert(
                    "alloc".into(),
                    v.iter().map(|b| u64::from(*b)).sum::<u64>().to_string(),
                );
            }
            "probe.trap" => panic!("the probe was asked to panic"),
            "probe.print" => {
                println!("probe says hello on stdout");
                eprintln!("probe says hello on stderr");
                evhost_sdk::log::info("probe says hello through the log import");
            }
            "probe.spam" => {
                for i in 0..5000 {
                    println!("spam line {i:04} {}", "z".repeat(80));
                }
            }
            "probe.recurse" => {
                let mut pad = [0u8; 256];
                seen.insert("recurse".into(), recurse(0, &mut pad).to_string());
            }
            "probe.env" => {
                let home = std::env::var("HOME").unwrap_or_else(|e| format!("denied: {e}"));
                seen.insert("env".into(), home);
                seen.insert("args".into(), std::env::args().count().to_string());
            }
            "probe.file" => {
                let file = std::fs::read_to_string("/etc/hostname").map_err(|e| e.to_string());
                seen.insert("file".into(), format!("{file:?}"));
                let dir = std::fs::read_dir("/")
                    .map(|d| d.count())
                    .map_err(|e| e.to_string());
                seen.insert("dir".into(), format!("{dir:?}"));
            }
            "probe.net" => {
                let r = std::net::TcpStream::connect("127.0.0.1:9").map(|_| "connected");
                seen.insert("net".into(), format!("{r:?}"));
            }
            "probe.clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                seen.insert("clock".into(), now.to_string());
            }
            "probe.random" => {
                seen.insert(
                    "random".into(),
                    wasi::random::random::get_random_u64().to_string(),
                );
            }
            "probe.config" => {
                for (k, v) in evhost_sdk::config::entries() {
                    seen.insert(format!("config.{k}"), v);
                }
            }
            other => {
                let n: u64 = seen.get(other).and_then(|n| n.parse().ok()).unwrap_or(0);
                seen.insert(other.to_owned(), (n + 1).to_string());
            }
        }
        Ok(())
    }
}

evhost_sdk::export_projection!(Probe);

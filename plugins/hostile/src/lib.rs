//! hostile (tests only): an extractor that misbehaves on request, so the host's limits,
//! failure policy and sandbox can be tested end to end. Every other event type it echoes
//! as `hostile.ok` (except its own `hostile.ok` and `hostile.out`), so a test sees it keep
//! working around its poison events.
//!
//! | event type        | what it does                                                 |
//! |-------------------|--------------------------------------------------------------|
//! | `hostile.loop`    | loops forever                                                |
//! | `hostile.alloc`   | allocates and touches 512 MiB                                |
//! | `hostile.recurse` | recurses until the stack overflows                           |
//! | `hostile.trap`    | panics                                                       |
//! | `hostile.flood`   | derives 20,000 events                                        |
//! | `hostile.huge`    | derives one event with a 2 MiB payload                       |
//! | `hostile.long-error` | fails with an error message of 2 MiB                      |
//! | `hostile.invalid` | derives an event whose type is not a valid event type        |
//! | `hostile.schema`  | derives `hostile.out` with `{"n": "not a number"}`           |
//! | `hostile.file`    | insists on reading `/etc/hostname` (fails when denied)       |
//! | `hostile.env`     | insists on reading `HOME` (fails when denied)                |
//! | `hostile.net`     | insists on connecting to 127.0.0.1:9 (fails when denied)     |
//! | `hostile.state`   | calls `state.set` `count` times, each with a new key and a string of `bytes` bytes (payload `{"count": n, "bytes": b}`) |
//! | `evhost.plugin.dead_lettered` | panics (an alerting plugin whose alerts fail)    |

use evhost_sdk::{Error, Event, Extractor, NewEvent};

/// The misbehaving extractor.
pub struct Hostile;

#[inline(never)]
#[allow(unconditional_recursion)] // recursing until the stack overflows is the point
fn recurse(n: u64, pad: &mut [u8; 256]) -> u64 {
    pad[(n % 256) as usize] = n as u8;
    let mut next = *pad;
    recurse(n + 1, &mut next) + u64::from(pad[0])
}

fn derived(event_type: &str, stream: &str, payload: String) -> NewEvent {
    NewEvent {
        event_type: event_type.to_owned(),
        stream: stream.to_owned(),
        payload,
        metadata: Vec::new(),
    }
}

impl Extractor for Hostile {
    type State = ();

    fn extract(_: &mut (), e: &Event, out: &mut Vec<NewEvent>) -> Result<(), Error> {
        let stream = &e.stream;
        match &*e.event_type {
            "hostile.loop" => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "hostile.alloc" => {
                let v = vec![1u8; 512 << 20];
                let sum: u64 = v.iter().map(|b| u64::from(*b)).sum();
                out.push(derived("hostile.ok", stream, sum.to_string()));
            }
            "hostile.recurse" => {
                let mut pad = [0u8; 256];
                out.push(derived(
                    "hostile.ok",
                    stream,
                    recurse(0, &mut pad).to_string(),
                ));
            }
            "hostile.trap" => panic!("hostile was asked to panic"),
            "evhost.plugin.dead_lettered" => panic!("hostile fails on every announcement"),
            "hostile.flood" => {
                for i in 0..20_000 {
                    out.push(derived("hostile.ok", stream, i.to_string()));
                }
            }
            "hostile.huge" => {
                let big = format!("\"{}\"", "x".repeat(2 << 20));
                out.push(derived("hostile.ok", stream, big));
            }
            "hostile.long-error" => return Err(Error::Failed("e".repeat(2 << 20))),
            "hostile.invalid" => out.push(derived("Not A Type!", stream, "{}".into())),
            "hostile.schema" => out.push(derived(
                "hostile.out",
                stream,
                r#"{"n":"not a number"}"#.into(),
            )),
            "hostile.file" => {
                let text = std::fs::read_to_string("/etc/hostname")
                    .map_err(|e| Error::Failed(format!("reading /etc/hostname: {e}")))?;
                out.push(derived("hostile.ok", stream, format!("{text:?}")));
            }
            "hostile.env" => {
                let home = std::env::var("HOME")
                    .map_err(|e| Error::Failed(format!("reading the environment (HOME): {e}")))?;
                out.push(derived("hostile.ok", stream, format!("{home:?}")));
            }
            "hostile.net" => {
                std::net::TcpStream::connect("127.0.0.1:9")
                    .map_err(|e| Error::Failed(format!("connecting to 127.0.0.1:9: {e}")))?;
                out.push(derived("hostile.ok", stream, "\"connected\"".into()));
            }
            "hostile.state" => {
                let p: serde_json::Value = serde_json::from_str(&e.payload)
                    .map_err(|err| Error::InvalidInput(format!("payload: {err}")))?;
                let count = p["count"].as_u64().unwrap_or(1);
                let bytes = p["bytes"].as_u64().unwrap_or(1) as usize;
                let value = "x".repeat(bytes);
                for i in 0..count {
                    evhost_sdk::state::set(&format!("big-{i}"), &value);
                }
                out.push(derived("hostile.ok", stream, count.to_string()));
            }
            // Its own output: nothing, so it does not feed itself.
            "hostile.ok" | "hostile.out" => {}
            _ => out.push(derived("hostile.ok", stream, e.position.to_string())),
        }
        Ok(())
    }
}

evhost_sdk::export_extractor!(Hostile);

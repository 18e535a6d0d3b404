//! Router benchmark: one event type against 10,000 subscribed patterns, beside a linear
//! scan of the same patterns in the same run.
//!
//! `cargo bench -p evhost --bench router`

// The allocator the `evhost` binary uses, so the figures are the binary's.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;
use std::time::Instant;

use evhost::{Pattern, Router};

fn main() {
    let domains = [
        "assistant",
        "memory",
        "tool",
        "user",
        "plan",
        "answer",
        "evhost",
        "goal",
    ];
    let mut patterns = Vec::new();
    for i in 0..10_000usize {
        let d = domains[i % domains.len()];
        let p = match i % 4 {
            0 => format!("{d}.action{i}.done"),
            1 => format!("{d}.*.state{i}"),
            2 => format!("{d}.entity{i}.>"),
            _ => format!("{d}{i}.*"),
        };
        patterns.push(Pattern::new(&p).unwrap());
    }
    // A few that match the probe type.
    for p in ["assistant.>", "assistant.tool.*", "*.tool.executed", ">"] {
        patterns.push(Pattern::new(p).unwrap());
    }
    let mut router = Router::new();
    for (i, p) in patterns.iter().enumerate() {
        router.insert(p, i);
    }
    let types = [
        "assistant.tool.executed",
        "memory.entity.extracted",
        "user.query.received",
        "nothing.here.at.all",
    ];
    let iters = 2_000_000u64;
    let start = Instant::now();
    let mut hits = 0usize;
    for i in 0..iters {
        router.for_each_match(black_box(types[(i % 4) as usize]), |v| hits += *v & 1);
    }
    let trie_ns = start.elapsed().as_nanos() as f64 / iters as f64;
    black_box(hits);

    let scan_iters = 2_000u64;
    let start = Instant::now();
    let mut hits = 0usize;
    for i in 0..scan_iters {
        let t = black_box(types[(i % 4) as usize]);
        hits += patterns.iter().filter(|p| p.matches(t)).count();
    }
    let scan_ns = start.elapsed().as_nanos() as f64 / scan_iters as f64;
    black_box(hits);
    println!(
        "router    one type vs {} patterns, segment trie: {trie_ns:>8.0} ns/lookup (target well under 1,000 ns)",
        patterns.len()
    );
    println!(
        "router    same, linear scan of every pattern:   {scan_ns:>8.0} ns/lookup ({:.0}x slower)",
        scan_ns / trie_ns
    );
}

//! The `evhost` binary: see [`evhost::cli`].

// mimalloc as the process allocator only with the `mimalloc` feature (off by default: it
// held about three times glibc's memory for the same CPU; see BENCHMARKS.md). It belongs
// to the binary: a program embedding the library keeps its own.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    evhost::cli::main()
}

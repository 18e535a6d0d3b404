//! The `evhost` binary: see [`evhost::cli`].

// mimalloc as the process allocator (the `mimalloc` feature, on by default): fewer cycles
// in the append path than glibc malloc and less fragmentation in a long-running host. It
// belongs to the binary: a program embedding the library keeps its own.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    evhost::cli::main()
}

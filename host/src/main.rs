//! The `evhost` binary: see [`evhost::cli`].

fn main() -> std::process::ExitCode {
    evhost::cli::main()
}

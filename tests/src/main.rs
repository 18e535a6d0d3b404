//! The evhost binary as the end-to-end tests run it: the same entry point as `evhost`,
//! built inside this crate so the tests always run the code they were compiled with, with
//! the same (system) allocator.

fn main() -> std::process::ExitCode {
    evhost::cli::main()
}

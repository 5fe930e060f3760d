//! The switchyard binary, built inside the test crate so integration tests
//! can spawn (and kill) it as a separate process: it runs exactly the code
//! of `switchyard` (`switchyard::cli::main`).

fn main() -> std::process::ExitCode {
    switchyard::cli::main()
}

//! The `switchyard` binary.

fn main() -> std::process::ExitCode {
    switchyard::cli::main()
}

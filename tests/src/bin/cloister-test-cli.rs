//! The `cloister` command line, built inside the test crate so its integration tests can run it
//! as a child process (`CARGO_BIN_EXE_cloister-test-cli`), exactly as an operator would.

fn main() -> std::process::ExitCode {
    cloister_cli::main()
}

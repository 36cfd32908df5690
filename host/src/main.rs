fn main() -> std::process::ExitCode {
    cloister_host::cli::main()
}

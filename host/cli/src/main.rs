fn main() -> std::process::ExitCode {
    cloister_cli::main()
}

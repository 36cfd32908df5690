/// mimalloc rather than glibc's malloc: a busy node allocates on every thread (gRPC, Raft, the
/// state machine), and glibc's per-thread arenas spent about a tenth of its time in malloc and
/// free, and grew their heaps with `mprotect` (a TLB shootdown on every core).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cloister_cli::main()
}

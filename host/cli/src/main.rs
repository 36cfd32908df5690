use libmimalloc_sys::mi_option_t;

/// mimalloc rather than glibc's malloc: a busy node allocates on every thread (gRPC, Raft, the
/// state machine), and glibc's per-thread arenas spent about a tenth of its time in malloc and
/// free, and grew their heaps with `mprotect` (a TLB shootdown on every core).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`, by its place in `mi_option_e` (mimalloc.h), which
/// libmimalloc-sys does not name; a test checks it against the variable mimalloc reads it from.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// The variable that sets mimalloc's purge delay (milliseconds; -1 never purges). When it is set,
/// the process keeps the operator's value.
const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cloister_cli::main()
}

/// Keeps the memory mimalloc frees for the process to reuse, instead of handing it back to the
/// kernel a second after it is freed (mimalloc's default purge delay). A node's allocations move
/// between threads (tokio's workers and blocking pool, the writer, the log's sync thread), so
/// pages freed on one were purged and then touched again on another: each touch a page fault that
/// zeroes the page (2 MiB at a time with transparent huge pages), and each purge an `madvise` that
/// interrupts every core running the process. Zeroing alone was 4–9% of a loaded follower's
/// samples. The cost is memory: the process keeps its peak.
fn keep_freed_memory() {
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically on any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option's value in this process.
    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: reads one integer option.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    /// Set in the child process a test starts: the purge delay the child must end up with.
    const CHILD_VAR: &str = "CLOISTER_TEST_PURGE_DELAY_CHILD";

    /// Runs only in a child process that `run_child` starts (ignored otherwise, since it reads
    /// what the environment of its process was when mimalloc started).
    #[test]
    #[ignore = "run in a child process by run_child"]
    fn purge_delay_child() {
        let expected: std::ffi::c_long = std::env::var(CHILD_VAR).expect("set by run_child").parse().unwrap();
        if std::env::var_os(PURGE_DELAY_VAR).is_some() {
            // mimalloc read the variable into the option this binary names as the purge delay:
            // the option's number is the one the linked mimalloc gives it.
            assert_eq!(purge_delay(), expected);
        }
        keep_freed_memory();
        assert_eq!(purge_delay(), expected);
    }

    /// Runs `purge_delay_child` in a new process of this test binary, with `MIMALLOC_PURGE_DELAY`
    /// set to `variable` or unset, and checks that it ran and passed.
    fn run_child(variable: Option<&str>, expected: std::ffi::c_long) {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args(["--ignored", "--exact", "tests::purge_delay_child", "--test-threads", "1"]);
        child.env(CHILD_VAR, expected.to_string());
        match variable {
            Some(v) => child.env(PURGE_DELAY_VAR, v),
            None => child.env_remove(PURGE_DELAY_VAR),
        };
        let out = child.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the child test failed: {}\n{stdout}", out.status);
        assert!(stdout.contains("1 passed"), "the child test did not run:\n{stdout}");
    }

    /// The operator's value wins, and it is the option this binary sets.
    #[test]
    fn the_purge_delay_is_the_option_mimalloc_reads_from_its_variable() {
        run_child(Some("4321"), 4321);
    }

    /// Without the variable, the process keeps the memory it frees.
    #[test]
    fn without_the_variable_freed_memory_is_kept() {
        run_child(None, -1);
    }
}

# Everyday recipes. `just --list` shows them.

# Build the node and the contracts (the build script compiles the contracts to wasm).
build:
    cargo build --workspace

# The README's test command.
test:
    cargo test --workspace

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Everything CI runs.
ci:
    bash .ci/run

# Benchmarks, each printing its figures against its goal.
bench:
    cargo bench -p cloister-host --bench runtime

# A local network: identities, one process per node, the reconcile app.
sandbox *args:
    cargo run --release -- sandbox {{args}}

# Load a running sandbox over HTTPS.
bench-node *args:
    cargo run --release -- bench {{args}}

# Build one contract by hand, the way a contract developer would.
contract name="reconcile":
    cargo build --release --target wasm32-wasip1 -p {{name}}

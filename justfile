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
    cargo bench -p cloister-runtime --bench runtime
    cargo bench -p cloister-ledger --bench ledger

# Cloister side by side with etcd on this machine, 1 and 3 nodes, 1/16/256 clients, 10 s a point:
# needs etcd on PATH (Debian: apt-get install etcd-server etcd-client). Writes
# target/bench-peers/peers.md, peers.json and peers.png.
bench-peers *args:
    cargo build --release -p cloister-cli
    cargo build --release -p cloister-peers-bench
    target/release/cloister-peers-bench {{args}}

# Disaster recovery at scale: a 1-node release sandbox writes ENTRIES ledger entries, loses its
# state, and `sandbox --recover` brings it back; prints the time from `node recover` to open.
bench-recovery entries="1000000":
    cargo build --release -p cloister-cli
    scripts/bench-recovery.sh {{entries}} target/release/cloister

# A fresh node joins a 1-node network whose ledger holds ENTRIES entries (kv puts of distinct keys):
# prints the time from its start to serving reads from its own state, against the 30 s goal.
bench-join entries="1000000":
    CLOISTER_JOIN_ENTRIES={{entries}} cargo bench -p cloister-tests --bench join

# A local network: identities, one process per node, the reconcile app.
sandbox *args:
    cargo run --release -- sandbox {{args}}

# Load a running sandbox over HTTPS.
bench-node *args:
    cargo run --release -- bench {{args}}

# Build one contract by hand, the way a contract developer would.
contract name="reconcile":
    cargo build --release --target wasm32-wasip1 -p {{name}}

# The crash loop at length: ROUNDS SIGKILLs at random moments under load, on 1 and 3 nodes.
crash-loop rounds="300":
    CLOISTER_CRASH_ROUNDS={{rounds}} cargo test -p cloister-tests --test crash_loop -- --nocapture --test-threads 1

# The fast test tier: unit tests and in-process services.
test-fast:
    cargo test-fast

# Property tests of every parser of untrusted bytes, at length: CASES per target (CI runs 256).
fuzz cases="1000000":
    CLOISTER_FUZZ_CASES={{cases}} cargo test --release --workspace --lib fuzz
    CLOISTER_FUZZ_CASES={{cases}} cargo test --release -p cloister-attestation --test fuzz

# The Azure deployment's checks without Azure: Bicep rules, cloud-init schema, the scripts, and
# (as root) the local rehearsal in network namespaces. Needs deploy/azure-cvm/tests/requirements.txt,
# cloud-init and jq.
deploy-check:
    python3 deploy/azure-cvm/tests/check_bicep.py
    cloud-init schema --config-file deploy/azure-cvm/cloud-init.yaml
    python3 -m unittest discover -s deploy/azure-cvm/tests
    cargo build --release
    bash deploy/azure-cvm/tests/rehearse.sh target/release/cloister

#!/usr/bin/env bash
# Disaster recovery at scale: a 1-node release sandbox (reconcile app) takes 1-record ingests until
# its ledger holds ENTRIES entries; then every node's state is lost but a copy of the ledger
# folder, and `cloister sandbox --recover` brings the service back. Prints the time from
# `node recover` to an open service, and entries per second of recovery.
# Usage: scripts/bench-recovery.sh [ENTRIES] [BIN]   (defaults: 1000000, target/release/cloister)
set -euo pipefail
entries=${1:-1000000}
bin=$(realpath "${2:-target/release/cloister}")
port=${CLOISTER_BENCH_PORT:-8600}
work=$(mktemp -d)
dir="$work/sandbox"
sandbox_pid=""
cleanup() {
  if [ -n "$sandbox_pid" ] && kill -0 "$sandbox_pid" 2>/dev/null; then
    kill -INT "$sandbox_pid"
    wait "$sandbox_pid" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Waits (up to 300 s) until the sandbox's log says it is running.
wait_running() {
  for _ in $(seq 1 600); do
    if grep -q "Cloister sandbox is running" "$1"; then return 0; fi
    if ! kill -0 "$sandbox_pid" 2>/dev/null; then cat "$1"; return 1; fi
    sleep 0.5
  done
  echo "the sandbox did not come up within 300 s" >&2
  return 1
}

applied() {
  "$bin" call --sandbox "$dir" --as member0 GET /node/network 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["applied"].split(".")[-1])'
}

"$bin" sandbox --dir "$dir" --nodes 1 --port "$port" >"$work/first.log" 2>&1 &
sandbox_pid=$!
wait_running "$work/first.log"
echo "writing ${entries} ledger entries (1-record ingests, 256 clients)…"
while [ "$(applied)" -lt "$entries" ]; do
  "$bin" bench --sandbox "$dir" --clients 256 --seconds 20 --batch-records 0 >/dev/null
  echo "  ledger at $(applied) entries"
done
actual=$(applied)
kill -INT "$sandbox_pid"
wait "$sandbox_pid" || true
sandbox_pid=""
size=$(du -sh "$dir/data/node0/ledger" | cut -f1)

cp -r "$dir/data/node0/ledger" "$work/saved-ledger"
mv "$dir/data" "$work/lost-data"
start=$(date +%s.%N)
"$bin" sandbox --dir "$dir" --nodes 1 --port "$port" --recover "$work/saved-ledger" >"$work/recover.log" 2>&1 &
sandbox_pid=$!
wait_running "$work/recover.log"
end=$(date +%s.%N)
python3 - "$start" "$end" "$actual" "$size" <<'PY'
import sys
start, end, entries, size = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
took = end - start
print(f"recovery of a {entries:,}-entry ledger ({size}): {took:.1f} s from `node recover` to open, "
      f"{entries / took:,.0f} entries/s")
PY
echo "node0's recovery log:"
grep -E "verifies|recovering|restored|Opening" "$dir/node0.log" | sed 's/^/  /' || true

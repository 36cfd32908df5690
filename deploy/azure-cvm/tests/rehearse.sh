#!/usr/bin/env bash
# The local rehearsal of an Azure deployment: deploy.sh, add-node.sh, retire-node.sh and
# destroy.sh, run as an operator would, against 3 then 4 "VMs" that are network and mount
# namespaces on this machine (fake_az.py stands in for the Azure CLI), each booted from the same
# cloud-init.yaml that main.bicep embeds, with mock attestation in place of the vTPM.
#
# Usage: rehearse.sh [CLOISTER_BINARY]   (default: target/release/cloister; needs root, ip,
# nsenter, unshare, overlayfs, jq, curl, python3 with PyYAML and jmespath)
#
# All traffic stays on a bridge in a namespace this script makes: the operator's commands and
# the binary's download server run in an "operator" namespace on the same bridge. Everything it
# starts it stops, on success or failure (or SIGTERM: CI runs it under `timeout`);
# REHEARSAL_KEEP=1 keeps the working folder for a look.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DEPLOY="$(cd "$HERE/.." && pwd)"
REPO="$(cd "$DEPLOY/../.." && pwd)"
BINARY="$(realpath "${1:-$REPO/target/release/cloister}")"

[ "$(id -u)" = 0 ] || { echo "rehearse.sh needs root (network namespaces)" >&2; exit 2; }
[ -x "$BINARY" ] || { echo "no cloister binary at $BINARY (cargo build --release)" >&2; exit 2; }
for tool in ip nsenter unshare jq curl python3; do
  command -v "$tool" >/dev/null || { echo "rehearse.sh needs $tool" >&2; exit 2; }
done

WORK="$(mktemp -d /tmp/cloister-rehearsal.XXXXXX)"
export REHEARSAL_DIR="$WORK/az"
export REHEARSAL_SUBNET="10.77.0.0/24"
export REHEARSAL_LAN_NS="clr-lan"
export REHEARSAL_BRIDGE="clr-br"
export REHEARSAL_MOCK_ROOT="$WORK/mock-amd"
OP_NS="clr-op"
OP_IP="10.77.0.2"
GROUP="rehearsal"
STATE="$WORK/state"
mkdir -p "$WORK/bin" "$WORK/www" "$REHEARSAL_DIR"

step() { echo "== $*"; }
fail() {
  echo "REHEARSAL FAILED: $*" >&2
  for log in "$REHEARSAL_DIR"/vms/*/cloud-init-output.log "$REHEARSAL_DIR"/vms/*/var.up/lib/cloister/node.log; do
    [ -f "$log" ] && { echo "--- $log (last 15 lines)" >&2; tail -n 15 "$log" >&2; }
  done
  exit 1
}

cleanup() {
  local code=$?
  set +e
  if [ -f "$REHEARSAL_DIR/az-state.json" ]; then
    "$WORK/bin/az" group delete --name "$GROUP" --yes >/dev/null 2>&1
  fi
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null
  for ns in $(ip netns list | awk '{print $1}' | grep -E '^clr-'); do
    for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns"
  done
  if [ "${REHEARSAL_KEEP:-0}" = 1 ]; then
    echo "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

step "the network: a bridge namespace and the operator's namespace on $REHEARSAL_SUBNET"
if ip netns list | grep -qE '^clr-'; then
  echo "namespaces named clr-* exist already (another rehearsal?); not touching them" >&2
  trap - EXIT
  exit 2
fi
ip netns add "$REHEARSAL_LAN_NS"
ip -n "$REHEARSAL_LAN_NS" link add "$REHEARSAL_BRIDGE" type bridge
ip -n "$REHEARSAL_LAN_NS" link set "$REHEARSAL_BRIDGE" up
ip netns add "$OP_NS"
ip link add clr-hop type veth peer name clr-op0 netns "$OP_NS"
ip link set clr-hop netns "$REHEARSAL_LAN_NS"
ip -n "$REHEARSAL_LAN_NS" link set clr-hop master "$REHEARSAL_BRIDGE" up
ip -n "$OP_NS" link set lo up
ip -n "$OP_NS" addr add "$OP_IP/24" dev clr-op0
ip -n "$OP_NS" link set clr-op0 up

# The operator's tools: az is the stand-in, cloister runs in the operator's namespace.
cat >"$WORK/bin/az" <<EOF
#!/bin/sh
exec python3 "$HERE/fake_az.py" "\$@"
EOF
cat >"$WORK/bin/cloister" <<EOF
#!/bin/sh
exec ip netns exec $OP_NS "$BINARY" "\$@"
EOF
chmod +x "$WORK/bin/az" "$WORK/bin/cloister"
export PATH="$WORK/bin:$PATH"
export CLOISTER_CSR_WAIT_S=1 CLOISTER_CSR_TRIES=180

step "the operator's material: CA, members, SSH key, the binary and its hash"
cd "$WORK"
cloister ca init --out "$WORK" >/dev/null
for m in member0 member1 member2; do cloister keygen --name "$m" --out "$WORK" >/dev/null; done
ssh-keygen -q -t ed25519 -N '' -C rehearsal -f "$WORK/admin_ssh" </dev/null
cloister attestation mock-root --out "$REHEARSAL_MOCK_ROOT" >/dev/null
cp "$BINARY" "$WORK/www/cloister"
SHA="$(sha256sum "$WORK/www/cloister" | cut -d' ' -f1)"
ip netns exec "$OP_NS" python3 -m http.server 8080 --bind "$OP_IP" --directory "$WORK/www" \
  >"$WORK/http.log" 2>&1 &
SERVER_PID=$!

member() { echo "--cert $WORK/$1.cert.pem --key $WORK/$1.key.pem"; }
URL="https://10.77.0.10:8000"
ID="$STATE/service_identity.pem"
# shellcheck disable=SC2046
as() { local who="$1"; shift; cloister "$@" --url "$URL" --cacert "$ID" $(member "$who"); }

deploy() {
  "$DEPLOY/scripts/deploy.sh" --resource-group "$GROUP" --location local --node-count "$1" \
    --client-source 10.77.0.0/24 --binary-url "http://$OP_IP:8080/cloister" --binary-sha256 "$SHA" \
    --ca-cert "$WORK/service.cert.pem" --ca-key "$WORK/service.key.pem" \
    --member-cert "$WORK/member0.cert.pem" --member-cert "$WORK/member1.cert.pem" \
    --member-cert "$WORK/member2.cert.pem" --ssh-public-key "$WORK/admin_ssh.pub" --out "$STATE"
}

step "deploy.sh: 3 nodes"
deploy 3 || fail "deploy.sh"
[ "$(wc -l <"$STATE/nodes.tsv")" = 3 ] || fail "nodes.tsv lists $(wc -l <"$STATE/nodes.tsv") nodes"
for vm in "$REHEARSAL_DIR"/vms/*; do
  # The node's key was made in its VM; the operator's folders hold no node key.
  [ -f "$vm/var.up/lib/cloister/tls/node.key.pem" ] || fail "no node key in $vm"
done
if find "$WORK" -path "$REHEARSAL_DIR" -prune -o -name 'node.key.pem' -print | grep -q .; then
  fail "a node key outside a VM"
fi

voters() { cloister call GET /node/network --url "$URL" --cacert "$ID" 2>/dev/null |
  jq '[.nodes[] | select(.role == "leader" or .role == "follower")] | length'; }
wait_voters() {
  for _ in $(seq 1 120); do [ "$(voters)" = "$1" ] && return 0; sleep 1; done
  fail "the network did not reach $1 voters (has $(voters))"
}
wait_voters 3

step "the members open the service"
proposal="$(as member0 gov propose --action transition_service_to_open)" || fail "propose open"
pid="$(jq -r .proposal_id <<<"$proposal")"
as member0 gov vote "$pid" --approve >/dev/null || fail "member0 vote"
as member1 gov vote "$pid" --approve >/dev/null || fail "member1 vote"
state="$(cloister call GET /gov/service --url "$URL" --cacert "$ID" | jq -r .state)"
[ "$state" = Open ] || fail "the service is $state after the opening vote"

step "a reconciliation ingest and report"
SAMPLE="$REPO/tests/conformance/recon-sample"
as member0 call POST /app/csv/ingest --data "@$SAMPLE/member0_data.csv" --content-type text/csv >/dev/null ||
  fail "member0's ingest"
as member1 call POST /app/ingest --data "@$SAMPLE/member1_data.json" >/dev/null || fail "member1's ingest"
report="$(as member0 call GET /app/report)" || fail "member0's report"
rows="$(jq 'length' <<<"$report")"
[ "${rows:-0}" -gt 0 ] || fail "member0's report is empty: $report"
echo "member0's report has $rows records"

# member1 approves the proposal of ACTION that a script (pid SCRIPT, logging to LOG) files.
member1_votes_for() {
  local action="$1" script="$2" log="$3" open=""
  for _ in $(seq 1 120); do
    open="$(cloister call GET /gov/proposals --url "$URL" --cacert "$ID" 2>/dev/null |
      jq -r --arg action "$action" \
        '[.proposals[] | select(.state == "Open" and (.actions | index($action)))] | .[0].proposal_id // empty')"
    [ -n "$open" ] && break
    kill -0 "$script" 2>/dev/null || break
    sleep 1
  done
  [ -n "$open" ] || { cat "$log" >&2; fail "no $action proposal was filed"; }
  as member1 gov vote "$open" --approve >/dev/null || fail "member1's vote for $action"
}

step "add-node.sh: a fourth node joins and the members trust it"
"$DEPLOY/scripts/add-node.sh" --resource-group "$GROUP" --ca-cert "$WORK/service.cert.pem" \
  --ca-key "$WORK/service.key.pem" --state "$STATE" --member-cert "$WORK/member0.cert.pem" --member-key "$WORK/member0.key.pem" \
  --wait-timeout 120 >"$WORK/add-node.log" 2>&1 &
adder=$!
member1_votes_for transition_node_to_trusted "$adder" "$WORK/add-node.log"
wait "$adder" || { cat "$WORK/add-node.log" >&2; fail "add-node.sh"; }
cat "$WORK/add-node.log"
wait_voters 4

step "retire-node.sh: node 2 is retired, then deallocated"
"$DEPLOY/scripts/retire-node.sh" --resource-group "$GROUP" --node cloister-node2 --state "$STATE" \
  --member-cert "$WORK/member0.cert.pem" --member-key "$WORK/member0.key.pem" --wait-timeout 120 \
  >"$WORK/retire.log" 2>&1 &
retirer=$!
member1_votes_for remove_node "$retirer" "$WORK/retire.log"
wait "$retirer" || { cat "$WORK/retire.log" >&2; fail "retire-node.sh"; }
cat "$WORK/retire.log"
power="$(az vm show --resource-group "$GROUP" --name cloister-node2 --query powerState --output tsv)"
[ "$power" = "VM deallocated" ] || fail "cloister-node2 is '$power' after retire-node.sh"
wait_voters 3
[ -z "$(ip netns pids clr-vm2)" ] || fail "a process still runs in the retired VM"

step "writes go on without the retired node"
as member2 call POST /app/ingest --data "@$SAMPLE/member2_data.json" >/dev/null || fail "member2's ingest"
as member2 call GET /app/report >/dev/null || fail "member2's report"
# The new node serves the service too.
cloister call GET /gov/service --url "https://10.77.0.13:8000" --cacert "$ID" >/dev/null ||
  fail "the added node does not answer"

step "deploy.sh again (an update): running nodes and the retired one are left alone"
deploy 4 >"$WORK/redeploy.log" 2>&1 || { cat "$WORK/redeploy.log" >&2; fail "deploy.sh rerun"; }
grep -q "cloister-node2 is not running" "$WORK/redeploy.log" || fail "the rerun did not skip the retired node"
[ "$(grep -c "runs already" "$WORK/redeploy.log")" = 3 ] || fail "the rerun did not leave the 3 running nodes alone"
power="$(az vm show --resource-group "$GROUP" --name cloister-node2 --query powerState --output tsv)"
[ "$power" = "VM deallocated" ] || fail "the rerun changed cloister-node2 to '$power'"
wait_voters 3

step "destroy.sh"
"$DEPLOY/scripts/destroy.sh" --resource-group "$GROUP" --yes || fail "destroy.sh"
for i in 0 1 2 3; do
  ! ip netns list | grep -q "^clr-vm$i" || fail "clr-vm$i is still there after destroy.sh"
done
echo "REHEARSAL PASSED"

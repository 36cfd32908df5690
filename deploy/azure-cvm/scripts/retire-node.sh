#!/usr/bin/env bash
# Retires a node: governance first (remove_node, passed by the members), then deallocation.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: retire-node.sh --resource-group RG --node NAME --member-cert FILE --member-key FILE
                      [--state DIR] [--wait-timeout S] [--dry-run]

Files a remove_node proposal for NAME as the given member and votes for it, waits until the
members have passed it and the node has left the network's consensus, and only then deallocates
its VM. A node is never switched off while the service still counts on it. The VM and its disk
stay (deallocated, billed for storage only) so its name is not reused; destroy.sh removes them.

  --resource-group RG     the network's resource group
  --node NAME             the VM to retire, e.g. cloister-node2
  --member-cert FILE      the proposing member's certificate
  --member-key FILE       that member's key
  --state DIR             deploy.sh's output folder (default ./cloister-RG)
  --wait-timeout S        how long to wait for the members' votes (default 3600)
  --dry-run               print the commands instead of running them
  -h, --help              this text
USAGE
}

group="" node="" member_cert="" member_key="" state="" wait_timeout=3600
while [ $# -gt 0 ]; do
  case "$1" in
    --resource-group) group="${2:-}"; shift 2 ;;
    --node) node="${2:-}"; shift 2 ;;
    --member-cert) member_cert="${2:-}"; shift 2 ;;
    --member-key) member_key="${2:-}"; shift 2 ;;
    --state) state="${2:-}"; shift 2 ;;
    --wait-timeout) wait_timeout="${2:-}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
require --resource-group "$group"
require --node "$node"
require --member-cert "$member_cert"
require --member-key "$member_key"
check_name --resource-group "$group"
check_name --node "$node"
check_file --member-cert "$member_cert"
check_file --member-key "$member_key"
[[ "$wait_timeout" =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds (got '$wait_timeout')"
state="${state:-./cloister-$group}"

if [ "$DRY_RUN" = 1 ]; then
  echo "$CLOISTER gov propose --action remove_node --args '{\"node_id\": \"<id of $node>\"}' --cert $member_cert --key $member_key …" >&2
  echo "(wait for the proposal to be Accepted and $node to leave GET /node/network)" >&2
  az_run vm deallocate --resource-group "$group" --name "$node"
  exit 0
fi

identity="$state/service_identity.pem"
check_file "the state folder's service identity" "$identity"
grep -q "^$node	" "$state/nodes.tsv" || die "--node: $node is not a node of $group (see $state/nodes.tsv)"
node_line="$(running_node "$group" "$state" "$node")"
read -r _ _ via_host <<<"$node_line"
url="https://$via_host:$HTTPS_PORT"
record="$(node_record "$url" "$identity" "$node")"
[ -n "$record" ] || die "the service has no record of $node"
read -r node_id status <<<"$record"
[ "$status" != Retired ] || note "$node is Retired already"
if [ "$status" != Retired ]; then
  id="$(propose_and_approve "$url" "$identity" "$member_cert" "$member_key" remove_node "{\"node_id\": \"$node_id\"}")"
  note "proposal $id retires $node; waiting for the members' votes"
  wait_accepted "$url" "$identity" "$id" "$wait_timeout"
fi
note "waiting for $node to leave the network"
for _ in $(seq 1 90); do
  # Only an answer that lists the network without the node counts; a failed call is asked again.
  if network="$("$CLOISTER" call GET /node/network --url "$url" --cacert "$identity" 2>/dev/null)" &&
    jq -e '.nodes | length > 0' >/dev/null <<<"$network" &&
    ! jq -e --arg name "$node" '.nodes[] | select(.name == $name)' >/dev/null <<<"$network"; then
    note "$node has left; deallocating its VM"
    az_run vm deallocate --resource-group "$group" --name "$node"
    note "$node is retired and deallocated"
    exit 0
  fi
  sleep 2
done
die "$node is still in the network 180 s after its retirement passed; not deallocating"

#!/usr/bin/env bash
# Adds nodes to a running Cloister network: a larger deployment, then the new VMs' keys certified
# and the nodes started; members then trust them by proposal.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: add-node.sh --resource-group RG --ca-cert FILE --ca-key FILE [--count K] [--state DIR]
                   [--member-cert FILE --member-key FILE] [--wait-timeout S] [--dry-run]

Redeploys main.bicep with the previous deployment's parameters and K more nodes (default 1),
certifies each new VM's key with the operator's CA (the key never leaves the VM) and starts it.
It joins through a running node and, once the service is open, waits as Pending until members
pass transition_node_to_trusted. With --member-cert/--member-key (an operator who is also a
member) this script files that proposal and votes for it, then waits for it to pass;
otherwise it prints the proposal for the members.

  --resource-group RG     the network's resource group
  --ca-cert, --ca-key     the operator's CA
  --count K               how many nodes to add, 1 to 15 (default 1)
  --state DIR             deploy.sh's output folder (default ./cloister-RG)
  --member-cert FILE      a member's certificate, to propose trusting the new nodes
  --member-key FILE       that member's key
  --wait-timeout S        how long to wait for each proposal to pass (default 3600)
  --dry-run               print the az commands instead of running them
  -h, --help              this text
USAGE
}

group="" ca_cert="" ca_key="" count=1 state="" member_cert="" member_key="" wait_timeout=3600
while [ $# -gt 0 ]; do
  case "$1" in
    --resource-group) group="${2:-}"; shift 2 ;;
    --ca-cert) ca_cert="${2:-}"; shift 2 ;;
    --ca-key) ca_key="${2:-}"; shift 2 ;;
    --count) count="${2:-}"; shift 2 ;;
    --state) state="${2:-}"; shift 2 ;;
    --member-cert) member_cert="${2:-}"; shift 2 ;;
    --member-key) member_key="${2:-}"; shift 2 ;;
    --wait-timeout) wait_timeout="${2:-}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
require --resource-group "$group"
require --ca-cert "$ca_cert"
require --ca-key "$ca_key"
check_name --resource-group "$group"
check_node_count --count "$count"
check_file --ca-cert "$ca_cert"
check_file --ca-key "$ca_key"
[[ "$wait_timeout" =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds (got '$wait_timeout')"
if [ -n "$member_cert$member_key" ]; then
  check_file --member-cert "$member_cert"
  check_file --member-key "$member_key"
fi
state="${state:-./cloister-$group}"

params="$(mktemp --suffix=.parameters.json)"
trap 'rm -f "$params"' EXIT
if [ "$DRY_RUN" = 1 ]; then
  az_run deployment group show --resource-group "$group" --name "$DEPLOYMENT_NAME" --query properties.parameters --output json
  az_run deployment group create --resource-group "$group" --name "$DEPLOYMENT_NAME" \
    --template-file "$TEMPLATE_DIR/main.bicep" --parameters "@$params" --output none
  activate_new_nodes "$group" "$ca_cert" "$ca_key" "https://RUNNING_NODE:$PEER_PORT"
  exit 0
fi

check_file "the state folder's service identity" "$state/service_identity.pem"
before="$(az_run deployment group show --resource-group "$group" --name "$DEPLOYMENT_NAME" \
  --query properties.parameters --output json)"
total="$(printf '%s' "$before" | jq -r '.nodeCount.value') + $count"
total=$((total))
[ "$total" -le 15 ] || die "--count $count would make $total nodes; main.bicep allows 15"
printf '%s' "$before" | jq --argjson n "$total" '{
    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
    contentVersion: "1.0.0.0",
    parameters: (map_values({ value: .value }) | .nodeCount.value = $n) }' >"$params"
note "growing the deployment to $total node(s)"
az_run deployment group create --resource-group "$group" --name "$DEPLOYMENT_NAME" \
  --template-file "$TEMPLATE_DIR/main.bicep" --parameters "@$params" --output none

# New nodes attest through a node that runs now (a follower sends them on to the leader).
node_line="$(running_node "$group" "$state")"
read -r _ via via_host <<<"$node_line"
url="https://$via_host:$HTTPS_PORT"
activate_new_nodes "$group" "$ca_cert" "$ca_key" "https://$via:$PEER_PORT"
old_names="$(cut -f1 "$state/nodes.tsv")"
write_nodes "$group" "$state"

while IFS=$'\t' read -r name _ _ <&3; do
  if grep -qx "$name" <<<"$old_names"; then continue; fi
  record=""
  for _ in $(seq 1 60); do
    record="$(node_record "$url" "$state/service_identity.pem" "$name")"
    [ -n "$record" ] && break
    sleep 2
  done
  [ -n "$record" ] || die "$name did not attest to the service within 120 s (see its /var/lib/cloister/node.log)"
  read -r node_id status <<<"$record"
  note "$name attested as node $node_id: $status"
  [ "$status" = Pending ] || continue
  trust_args="{\"node_id\": \"$node_id\"}"
  if [ -n "$member_cert" ]; then
    id="$(propose_and_approve "$url" "$state/service_identity.pem" "$member_cert" "$member_key" \
      transition_node_to_trusted "$trust_args")"
    note "proposal $id trusts $name; waiting for the members' votes"
    wait_accepted "$url" "$state/service_identity.pem" "$id" "$wait_timeout"
    note "$name is Trusted"
  else
    echo "Members trust $name with:"
    echo "  $CLOISTER gov propose --url $url --cacert $state/service_identity.pem --cert MEMBER.cert.pem --key MEMBER.key.pem \\"
    echo "      --action transition_node_to_trusted --args '$trust_args'"
  fi
done 3<"$state/nodes.tsv"

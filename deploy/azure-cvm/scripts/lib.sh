# shellcheck shell=bash
# Shared by deploy.sh, add-node.sh, retire-node.sh and destroy.sh: argument checks, the `az`
# runner with its dry-run mode, and the node certificate hand-off over `az vm run-command`.

AZ="${CLOISTER_AZ:-az}"
CLOISTER="${CLOISTER:-cloister}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATE_DIR="$(cd "$HERE/.." && pwd)"
DEPLOYMENT_NAME="cloister"
# main.bicep's default ports: clients' HTTPS, and the peers' port inside the subnet (used by the
# scripts that source this file).
# shellcheck disable=SC2034
HTTPS_PORT=8000
# shellcheck disable=SC2034
PEER_PORT=8002
DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 2
}
note() { echo "==> $*" >&2; }

# Runs an `az` command, or prints it in dry-run mode (and prints nothing else to stdout).
az_run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$AZ" "$@" >&2
    echo >&2
    return 0
  fi
  "$AZ" "$@"
}

# Argument checks: each refuses a missing or malformed value with a message naming the option,
# before anything is sent to Azure.
require() { [ -n "${2:-}" ] || die "$1 is required"; }
check_node_count() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] && [ "$2" -le 15 ] || die "$1 must be a whole number from 1 to 15 (got '$2')"
}
check_vm_size() {
  # AMD SEV-SNP confidential VM sizes: DCasv5, DCadsv5, ECasv5, ECadsv5 and their v6 successors.
  [[ "$2" =~ ^Standard_(DC|EC)[0-9]+a(d)?s_v[56]$ ]] ||
    die "$1 must be an AMD SEV-SNP confidential VM size such as Standard_DC2as_v5 (got '$2')"
}
check_cidr() {
  local ip prefix octet
  [[ "$2" =~ ^([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)/([0-9]+)$ ]] ||
    die "$1 must be an IPv4 range in CIDR form such as 203.0.113.0/24 (got '$2')"
  ip="${BASH_REMATCH[1]}"
  prefix="${BASH_REMATCH[2]}"
  [ "$prefix" -le 32 ] || die "$1 has a prefix length over 32 (got '$2')"
  IFS=. read -r -a octets <<<"$ip"
  for octet in "${octets[@]}"; do
    [ "$octet" -le 255 ] || die "$1 has an address octet over 255 (got '$2')"
  done
}
check_url() {
  # The binary's integrity rests on its SHA-256, which bootstrap.sh checks before installing.
  [[ "$2" =~ ^https?://[^[:space:]\']+$ ]] || die "$1 must be an http(s):// URL without spaces or quotes (got '$2')"
}
check_sha256() {
  [[ "$2" =~ ^[0-9a-fA-F]{64}$ ]] || die "$1 must be 64 hexadecimal digits (got '$2')"
}
check_name() {
  [[ "$2" =~ ^[a-z][a-z0-9-]{0,30}$ ]] ||
    die "$1 must be lowercase letters, digits and hyphens, starting with a letter (got '$2')"
}
check_file() { [ -f "$2" ] || die "$1: no such file '$2'"; }

# Prints what a Linux run-command script wrote to stdout: az wraps it in a message
# "Enable succeeded: \n[stdout]\n…\n[stderr]\n…". Arguments after SCRIPT are its $1, $2, ….
run_command() {
  local group="$1" vm="$2" script="$3"
  shift 3
  local az_args=(vm run-command invoke --resource-group "$group" --name "$vm" --command-id RunShellScript
    --scripts "$script" --query 'value[0].message' --output tsv)
  [ $# -eq 0 ] || az_args+=(--parameters "$@")
  if [ "$DRY_RUN" = 1 ]; then
    az_run "${az_args[@]}"
    return 0
  fi
  az_run "${az_args[@]}" | sed -n '/^\[stdout\]$/,/^\[stderr\]$/p' | sed '1d;$d'
}

# The nodes of the deployment, one per line: name, private IP, public host (tab-separated).
deployed_nodes() {
  local group="$1"
  az_run deployment group show --resource-group "$group" --name "$DEPLOYMENT_NAME" \
    --query 'properties.outputs.nodes.value[].[name, privateIp, publicHost]' --output tsv
}

# Fetches a node's signing request (waiting for bootstrap.sh), certifies its key with the CA for
# the node's private IP and public host name, and hands the certificate to activate.sh, which
# starts the node (joining JOIN_URL when given). The node's private key never leaves the VM.
certify_and_activate() {
  local group="$1" vm="$2" private_ip="$3" public_host="$4" ca_cert="$5" ca_key="$6" join_url="${7:-}"
  local csr cert work
  note "certifying $vm ($private_ip, $public_host)"
  if [ "$DRY_RUN" = 1 ]; then
    run_command "$group" "$vm" 'cat /var/lib/cloister/tls/node.csr.pem'
    echo "$CLOISTER ca sign node.csr.pem --name $vm --host $private_ip --host $public_host --ca-cert $ca_cert --ca-key $ca_key --out $vm.cert.pem" >&2
    run_command "$group" "$vm" 'bash /usr/local/lib/cloister/activate.sh "$@"' "<unpadded base64 of $vm.cert.pem>" ${join_url:+"$join_url"}
    return 0
  fi
  csr="$(wait_for_pem "$group" "$vm" /var/lib/cloister/tls/node.csr.pem "BEGIN CERTIFICATE REQUEST")" ||
    die "$vm published no signing request; is bootstrap.sh failing? (see /var/log/cloud-init-output.log)"
  work="$(mktemp -d)"
  printf '%s\n' "$csr" >"$work/$vm.csr.pem"
  "$CLOISTER" ca sign "$work/$vm.csr.pem" --name "$vm" --host "$private_ip" --host "$public_host" \
    --ca-cert "$ca_cert" --ca-key "$ca_key" --out "$work/$vm.cert.pem"
  # Without base64's '=' padding: az run-command takes a parameter holding '=' for NAME=VALUE.
  cert="$(base64 -w0 <"$work/$vm.cert.pem" | tr -d '=')"
  rm -rf "$work"
  local answer
  answer="$(run_command "$group" "$vm" 'bash /usr/local/lib/cloister/activate.sh "$@" 2>&1' "$cert" ${join_url:+"$join_url"})"
  printf '%s\n' "$answer" | sed "s/^/  $vm: /" >&2
  grep -qx "cloister-activate: started" <<<"$answer" || die "$vm did not start (its output is above)"
}

# Prints FILE of a VM once it holds MARKER, asking every CLOISTER_CSR_WAIT_S seconds (default 10)
# up to CLOISTER_CSR_TRIES times (default 60); fails if it never does. A failed call (the VM agent
# not up yet, a transient error) is one more try, not the end.
wait_for_pem() {
  local group="$1" vm="$2" file="$3" marker="$4" pem tries=0
  while :; do
    pem="$(run_command "$group" "$vm" "cat $file 2>/dev/null || true")" || pem=""
    case "$pem" in *"$marker"*) printf '%s\n' "$pem"; return 0 ;; esac
    tries=$((tries + 1))
    [ "$tries" -lt "${CLOISTER_CSR_TRIES:-60}" ] || return 1
    sleep "${CLOISTER_CSR_WAIT_S:-10}"
  done
}

# Copies the service identity's certificate (which clients pin) from a node to FILE, through the
# operator's authenticated run-command channel.
fetch_service_identity() {
  local group="$1" vm="$2" out="$3" pem
  pem="$(wait_for_pem "$group" "$vm" /var/lib/cloister/data/service_identity.pem "BEGIN CERTIFICATE")" ||
    die "$vm has not written the service identity yet"
  printf '%s\n' "$pem" >"$out"
}

# Standard input as a JSON string.
json_string() {
  awk 'BEGIN { ORS = ""; print "\"" }
       { gsub(/\\/, "\\\\\\\\"); gsub(/"/, "\\\""); gsub(/\t/, "\\t"); gsub(/\r/, ""); if (NR > 1) print "\\n"; print }
       END { print "\"" }'
}

# Creates the resource group if needed and deploys main.bicep (incrementally: existing VMs keep
# their disks and keys; a larger NODE_COUNT adds VMs). Parameters go in a parameters file.
deploy_template() {
  local group="$1" location="$2" node_count="$3" vm_size="$4" prefix="$5" client_source="$6" binary_url="$7"
  local binary_sha256="$8" ca_cert="$9" ssh_key="${10}" enable_ssh="${11}" app="${12}"
  shift 12
  local params m first=1
  params="$(mktemp --suffix=.parameters.json)"
  {
    echo '{ "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",'
    echo '  "contentVersion": "1.0.0.0", "parameters": {'
    echo "    \"nodeCount\": { \"value\": $node_count },"
    echo "    \"vmSize\": { \"value\": $(printf '%s' "$vm_size" | json_string) },"
    echo "    \"namePrefix\": { \"value\": $(printf '%s' "$prefix" | json_string) },"
    echo "    \"clientSourcePrefix\": { \"value\": $(printf '%s' "$client_source" | json_string) },"
    echo "    \"binaryUrl\": { \"value\": $(printf '%s' "$binary_url" | json_string) },"
    echo "    \"binarySha256\": { \"value\": $(printf '%s' "$binary_sha256" | tr 'A-F' 'a-f' | json_string) },"
    echo "    \"serviceCaCertificate\": { \"value\": $(json_string <"$ca_cert") },"
    echo "    \"sshPublicKey\": { \"value\": $(json_string <"$ssh_key") },"
    echo "    \"enableSsh\": { \"value\": $enable_ssh },"
    echo "    \"app\": { \"value\": $(printf '%s' "$app" | json_string) },"
    printf '    "memberCertificates": { "value": ['
    for m in "$@"; do
      [ $first = 1 ] || printf ', '
      first=0
      json_string <"$m"
    done
    echo '] } } }'
  } >"$params"
  az_run account show --output none || die "not logged in to Azure: run az login"
  az_run group create --name "$group" --location "$location" --output none
  note "deploying $node_count node(s) to $group"
  az_run deployment group create --resource-group "$group" --name "$DEPLOYMENT_NAME" \
    --template-file "$TEMPLATE_DIR/main.bicep" --parameters "@$params" --output none
  rm -f "$params"
}

# Certifies and starts every node of the deployment that is not running yet (a node whose VM holds
# a certificate already is left alone, so a rerun is an update). JOIN_URL, when given, is where a
# joining node attests (any Trusted node: followers point it at the leader).
activate_new_nodes() {
  local group="$1" ca_cert="$2" ca_key="$3" join_url="$4" name ip host state
  if [ "$DRY_RUN" = 1 ]; then
    deployed_nodes "$group"
    certify_and_activate "$group" "NODE" "PRIVATE_IP" "PUBLIC_HOST" "$ca_cert" "$ca_key" "$join_url"
    note "(dry run: the three commands above run for each node without a certificate)"
    return 0
  fi
  local running
  running="$(running_vms "$group")"
  while IFS=$'\t' read -r name ip host <&3; do
    if ! grep -qx "$name" <<<"$running"; then
      note "$name is not running (retired, or stopped by hand); left alone"
      continue
    fi
    state="$(run_command "$group" "$name" 'test -f /var/lib/cloister/tls/node.cert.pem && echo active || echo new')"
    if [ "$state" = active ]; then
      note "$name runs already"
      continue
    fi
    certify_and_activate "$group" "$name" "$ip" "$host" "$ca_cert" "$ca_key" "$join_url"
  done 3< <(deployed_nodes "$group")
}

# The VMs of the group that run, one name per line.
running_vms() {
  az_run vm list --resource-group "$1" --show-details --query "[?powerState=='VM running'].name" --output tsv
}

# The first node of STATE/nodes.tsv whose VM runs, other than EXCEPT: "NAME PRIVATE_IP PUBLIC_HOST".
running_node() {
  local group="$1" state="$2" except="${3:-}" running name ip host
  running="$(running_vms "$group")"
  while IFS=$'\t' read -r name ip host; do
    [ "$name" = "$except" ] && continue
    grep -qx "$name" <<<"$running" || continue
    echo "$name $ip $host"
    return 0
  done <"$state/nodes.tsv"
  die "no running node in $state/nodes.tsv${except:+ other than $except}"
}

# Writes the deployment's node list to STATE/nodes.tsv (whole, or not at all).
write_nodes() {
  local group="$1" state="$2"
  deployed_nodes "$group" >"$state/nodes.tsv.tmp"
  mv "$state/nodes.tsv.tmp" "$state/nodes.tsv"
}

# The service's record of node NAME (id and status), from GET /node/attestations: "ID STATUS".
node_record() {
  local url="$1" identity="$2" name="$3"
  local answer
  answer="$("$CLOISTER" call GET /node/attestations --url "$url" --cacert "$identity" 2>/dev/null)" || return 0
  jq -r --arg name "$name" '.nodes[] | select(.name == $name) | "\(.node_id) \(.status)"' <<<"$answer" | tail -n1
}

# Files a proposal of one action as the member (CERT, KEY), votes for it, and prints its id.
propose_and_approve() {
  local url="$1" identity="$2" cert="$3" key="$4" action="$5" action_args="$6" answer id
  answer="$("$CLOISTER" gov propose --url "$url" --cacert "$identity" --cert "$cert" --key "$key" \
    --action "$action" --args "$action_args")" || die "the service refused the $action proposal: $answer"
  id="$(printf '%s' "$answer" | jq -r .proposal_id)"
  [ -n "$id" ] && [ "$id" != null ] || die "the $action proposal got no id: $answer"
  if [ "$(printf '%s' "$answer" | jq -r .state)" = Open ]; then
    "$CLOISTER" gov vote "$id" --approve --url "$url" --cacert "$identity" --cert "$cert" --key "$key" >/dev/null ||
      die "voting for proposal $id failed"
  fi
  echo "$id"
}

# Waits until proposal ID is Accepted (other members vote meanwhile); fails if it ends otherwise.
wait_accepted() {
  local url="$1" identity="$2" id="$3" timeout_s="$4" state waited=0
  while :; do
    state="$("$CLOISTER" gov show "$id" --url "$url" --cacert "$identity" 2>/dev/null | jq -r .state)" || state=""
    case "$state" in
      Accepted) return 0 ;;
      Open | "") ;;
      *) die "proposal $id ended $state" ;;
    esac
    [ "$waited" -lt "$timeout_s" ] || die "proposal $id is still $state after ${timeout_s}s; members vote with: $CLOISTER gov vote $id --approve …"
    sleep 2
    waited=$((waited + 2))
  done
}

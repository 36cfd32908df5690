#!/usr/bin/env bash
# Creates or updates a Cloister network of confidential VMs in one resource group.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: deploy.sh --resource-group RG --location LOCATION --client-source CIDR
                 --binary-url URL --binary-sha256 HEX --ca-cert FILE --ca-key FILE
                 --member-cert FILE [--member-cert FILE …] --ssh-public-key FILE
                 [--node-count N] [--vm-size SIZE] [--name-prefix NAME] [--app reconcile|banking|none]
                 [--enable-ssh] [--out DIR] [--dry-run]

Creates (or updates) the resource group, deploys main.bicep, then for every node not yet
running: fetches the signing request its VM generated, certifies the key with the operator's CA
(the key never leaves the VM), and hands the certificate back, which starts the node. Node 0
starts the service; the others join it. Finally it copies the service identity's certificate
(which clients pin) to DIR/service_identity.pem and prints the members' next steps.

  --resource-group RG     the resource group (created if absent)
  --location LOCATION     an Azure region with AMD SEV-SNP confidential VMs, e.g. westeurope
  --client-source CIDR    who may reach the HTTPS and gRPC ports, e.g. 203.0.113.0/24
  --binary-url URL        where each VM downloads the cloister binary (Linux x86-64)
  --binary-sha256 HEX     its SHA-256; a VM refuses a binary that does not match
  --ca-cert, --ca-key     the operator's CA (cloister ca init); the key stays on this machine
  --member-cert FILE      a genesis member's certificate (repeat; at least one)
  --ssh-public-key FILE   the admin account's key (Azure requires one; SSH stays closed
                          unless --enable-ssh)
  --node-count N          1 to 15 (default 3)
  --vm-size SIZE          an AMD SEV-SNP size (default Standard_DC2as_v5)
  --name-prefix NAME      VM names are NAME-node0, NAME-node1, … (default cloister)
  --app APP               the app installed at genesis (default reconcile)
  --enable-ssh            open port 22 to --client-source (key-only)
  --out DIR               where to write service_identity.pem and nodes.tsv (default ./cloister-RG)
  --dry-run               print the az commands instead of running them
  -h, --help              this text
USAGE
}

group="" location="" client_source="" binary_url="" binary_sha256="" ca_cert="" ca_key="" ssh_key=""
node_count=3 vm_size="Standard_DC2as_v5" prefix="cloister" app="reconcile" enable_ssh=false out=""
members=()
while [ $# -gt 0 ]; do
  case "$1" in
    --resource-group) group="${2:-}"; shift 2 ;;
    --location) location="${2:-}"; shift 2 ;;
    --client-source) client_source="${2:-}"; shift 2 ;;
    --binary-url) binary_url="${2:-}"; shift 2 ;;
    --binary-sha256) binary_sha256="${2:-}"; shift 2 ;;
    --ca-cert) ca_cert="${2:-}"; shift 2 ;;
    --ca-key) ca_key="${2:-}"; shift 2 ;;
    --member-cert) members+=("${2:-}"); shift 2 ;;
    --ssh-public-key) ssh_key="${2:-}"; shift 2 ;;
    --node-count) node_count="${2:-}"; shift 2 ;;
    --vm-size) vm_size="${2:-}"; shift 2 ;;
    --name-prefix) prefix="${2:-}"; shift 2 ;;
    --app) app="${2:-}"; shift 2 ;;
    --enable-ssh) enable_ssh=true; shift ;;
    --out) out="${2:-}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

require --resource-group "$group"
require --location "$location"
require --client-source "$client_source"
require --binary-url "$binary_url"
require --binary-sha256 "$binary_sha256"
require --ca-cert "$ca_cert"
require --ca-key "$ca_key"
require --ssh-public-key "$ssh_key"
[ "${#members[@]}" -ge 1 ] || die "--member-cert is required (at least one genesis member)"
check_name --resource-group "$group"
check_node_count --node-count "$node_count"
check_vm_size --vm-size "$vm_size"
check_cidr --client-source "$client_source"
check_url --binary-url "$binary_url"
check_sha256 --binary-sha256 "$binary_sha256"
check_name --name-prefix "$prefix"
case "$app" in reconcile | banking | none) ;; *) die "--app must be reconcile, banking or none (got '$app')" ;; esac
check_file --ca-cert "$ca_cert"
check_file --ca-key "$ca_key"
check_file --ssh-public-key "$ssh_key"
for m in "${members[@]}"; do check_file --member-cert "$m"; done
grep -q "BEGIN CERTIFICATE" "$ca_cert" || die "--ca-cert '$ca_cert' holds no PEM certificate"
for m in "${members[@]}"; do grep -q "BEGIN CERTIFICATE" "$m" || die "--member-cert '$m' holds no PEM certificate"; done
# What goes to Azure is public; a file holding a private key is refused before anything is sent.
for f in "$ca_cert" "${members[@]}"; do
  ! grep -q "PRIVATE KEY" "$f" || die "'$f' holds a private key; pass certificate files only (--ca-cert, --member-cert)"
done
out="${out:-./cloister-$group}"

deploy_template "$group" "$location" "$node_count" "$vm_size" "$prefix" "$client_source" "$binary_url" \
  "$binary_sha256" "$ca_cert" "$ssh_key" "$enable_ssh" "$app" "${members[@]}"
activate_new_nodes "$group" "$ca_cert" "$ca_key" ""

if [ "$DRY_RUN" = 1 ]; then
  exit 0
fi
mkdir -p "$out"
write_nodes "$group" "$out"
node_line="$(running_node "$group" "$out")"
read -r first _ first_host <<<"$node_line"
fetch_service_identity "$group" "$first" "$out/service_identity.pem"
rest_url="https://$first_host:$HTTPS_PORT"
note "the network is up; clients pin $out/service_identity.pem"
cat <<NEXT

Members, next (each with their own key; see the operator's guide):
  $CLOISTER gov propose --url $rest_url --cacert $out/service_identity.pem \\
      --cert MEMBER.cert.pem --key MEMBER.key.pem --action transition_service_to_open
  $CLOISTER gov vote PROPOSAL_ID --approve --url $rest_url --cacert $out/service_identity.pem \\
      --cert OTHER_MEMBER.cert.pem --key OTHER_MEMBER.key.pem
NEXT

#!/usr/bin/env bash
# Deletes a Cloister network's resource group, and everything in it, after confirmation.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'USAGE'
Usage: destroy.sh --resource-group RG [--yes] [--dry-run]

Deletes the resource group: every VM, disk, address and network of the deployment. The
service's ledger goes with the disks; keep a copy of a node's ledger folder first if the
consortium may need it. Asks for the group's name unless --yes.

  --resource-group RG     the network's resource group
  --yes                   do not ask
  --dry-run               print the az command instead of running it
  -h, --help              this text
USAGE
}

group="" yes=0
while [ $# -gt 0 ]; do
  case "$1" in
    --resource-group) group="${2:-}"; shift 2 ;;
    --yes) yes=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
require --resource-group "$group"
check_name --resource-group "$group"
if [ "$yes" = 0 ] && [ "$DRY_RUN" = 0 ]; then
  read -r -p "Type the resource group's name to delete it and all it holds: " answer
  [ "$answer" = "$group" ] || die "not confirmed; nothing deleted"
fi
az_run group delete --name "$group" --yes
note "deleted $group"

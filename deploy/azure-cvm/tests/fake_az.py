#!/usr/bin/env python3
"""A stand-in for the Azure CLI, for the local rehearsal (rehearse.sh): the subset of `az` that
the deployment scripts use, acting on "VMs" that are network and mount namespaces on this machine.

A VM is a long-lived init process (`sleep infinity`) in its own network namespace (one veth on
the rehearsal's bridge, at the address main.bicep would give it: cidrHost(subnet, 9 + i)) and its
own mount namespace, where /etc, /var and /usr/local are overlays whose upper layers live in the
VM's folder. Creating a VM does what Azure and cloud-init would: it fills in the tokens of
cloud-init.yaml as main.bicep's replace() chain does, writes the document's write_files, and runs
its runcmd in the background. `vm run-command invoke` runs a script inside the VM and answers with
Azure's message format; `vm deallocate` stops every process of the VM; `group delete` removes all.

What differs from Azure, on purpose: the attestation token is `mock` (the rehearsal's test AMD
root stands in for the vTPM), the public host is the private address, and the Bicep is not
compiled here (check_bicep.py parses it; this file reads the parameters the scripts pass).

Configuration (environment): REHEARSAL_DIR (state and VM folders), REHEARSAL_SUBNET (a /24,
e.g. 10.77.0.0/24), REHEARSAL_LAN_NS (the namespace holding the bridge), REHEARSAL_BRIDGE,
REHEARSAL_MOCK_ROOT (the mock firmware root each VM gets as its "hardware").
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jmespath
import yaml

STATE_DIR = Path(os.environ.get("REHEARSAL_DIR", "/tmp/cloister-rehearsal"))
STATE_FILE = STATE_DIR / "az-state.json"
SUBNET = ipaddress.ip_network(os.environ.get("REHEARSAL_SUBNET", "10.77.0.0/24"))
LAN_NS = os.environ.get("REHEARSAL_LAN_NS", "clr-lan")
BRIDGE = os.environ.get("REHEARSAL_BRIDGE", "clr-br")
MOCK_ROOT = os.environ.get("REHEARSAL_MOCK_ROOT", "")
# The overlays each VM gets: the host's directory and the name of its upper layer.
OVERLAYS = [("/etc", "etc"), ("/var", "var"), ("/usr/local", "usrlocal")]
PORTS = {"httpsPort": 8000, "grpcPort": 8001, "peerPort": 8002}


class AzError(Exception):
    """An error az would print (as `ERROR: …`) with exit code 1."""


def load_state() -> dict[str, Any]:
    if STATE_FILE.exists():
        return json.loads(STATE_FILE.read_text())
    return {"groups": {}}


def save_state(state: dict[str, Any]) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_FILE)


def run(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, text=True, capture_output=True, **kw)


def cidr_host(index: int) -> str:
    """Bicep's cidrHost(subnet, index): index 0 is the first address after the network's."""
    return str(SUBNET.network_address + 1 + index)


# --- VMs -------------------------------------------------------------------------------------


def vm_namespace(index: int) -> str:
    return f"clr-vm{index}"


def create_vm(group: str, name: str, index: int, params: dict[str, Any], template_dir: Path) -> dict[str, Any]:
    ns = vm_namespace(index)
    ip = cidr_host(9 + index)
    root = STATE_DIR / "vms" / name
    root.mkdir(parents=True)
    # The network: a veth pair, one end in the VM's namespace, the other on the bridge.
    run("ip", "netns", "add", ns)
    outer, inner = f"clr-h{index}", f"clr-v{index}"
    run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
    run("ip", "link", "set", outer, "netns", LAN_NS)
    run("ip", "-n", LAN_NS, "link", "set", outer, "master", BRIDGE, "up")
    run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "-n", ns, "addr", "add", f"{ip}/{SUBNET.prefixlen}", "dev", inner)
    run("ip", "-n", ns, "link", "set", inner, "up")

    # The disk: overlays over the host's directories, filled by "cloud-init" before boot.
    for _, layer in OVERLAYS:
        (root / f"{layer}.up").mkdir()
        (root / f"{layer}.work").mkdir()
    document = render_cloud_init(template_dir / "cloud-init.yaml", name, index, ip, params)
    (root / "cloud-init.yaml").write_text(document)
    config = yaml.safe_load(document)
    for entry in config.get("write_files", []):
        write_file(root, entry)
    if MOCK_ROOT:
        shutil.copytree(MOCK_ROOT, upper_path(root, "/etc/cloister/mock-amd"))

    # Boot: an init process holding the mount namespace, then runcmd in the background.
    mounts = " && ".join(
        f"mount -t overlay overlay -o lowerdir={d},upperdir={root}/{layer}.up,workdir={root}/{layer}.work {d}"
        for d, layer in OVERLAYS
    )
    ready = root / "booted"
    init = subprocess.Popen(
        ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "bash", "-c",
         f"{mounts} && touch {ready} && exec sleep infinity"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(root / "init.log", "w"),
        start_new_session=True,
    )
    for _ in range(100):
        if ready.exists():
            break
        if init.poll() is not None:
            raise AzError(f"VM {name} failed to boot: {(root / 'init.log').read_text()}")
        time.sleep(0.05)
    else:
        raise AzError(f"VM {name} did not boot")
    vm = {"name": name, "index": index, "namespace": ns, "privateIp": ip, "root": str(root),
          "init": init.pid, "power": "running"}
    with open(root / "cloud-init-output.log", "w") as log:
        for command in config.get("runcmd", []):
            argv = command if isinstance(command, list) else ["sh", "-c", command]
            subprocess.Popen(in_vm(vm, [str(a) for a in argv]), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    return vm


def render_cloud_init(path: Path, name: str, index: int, ip: str, params: dict[str, Any]) -> str:
    """cloud-init.yaml with its tokens replaced, as node.bicep's replace() chain does."""
    members = "\n".join(params["memberCertificates"])
    values = {
        "NODE_NAME": name,
        "NODE_INDEX": str(index),
        "PRIVATE_IP": ip,
        "JOIN_ADDRESS": "" if index == 0 else cidr_host(9),
        "PUBLIC_HOST": ip,
        "HTTPS_PORT": str(PORTS["httpsPort"]),
        "GRPC_PORT": str(PORTS["grpcPort"]),
        "PEER_PORT": str(PORTS["peerPort"]),
        "BINARY_URL": params["binaryUrl"],
        "BINARY_SHA256": params["binarySha256"],
        # The one substitution Azure would not make: mock evidence in place of the vTPM's.
        "ATTESTATION": "mock",
        "APP": params.get("app", "reconcile"),
        "SSH": "on" if params.get("enableSsh") else "off",
        "SERVICE_CA_B64": base64.b64encode(params["serviceCaCertificate"].encode()).decode(),
        "MEMBERS_B64": base64.b64encode(members.encode()).decode(),
    }
    text = path.read_text()
    for key, value in values.items():
        text = text.replace(f"__CLOISTER_{key}__", value)
    left = re.findall(r"__CLOISTER_[A-Z0-9_]+__", text)
    if left:
        raise AzError(f"cloud-init.yaml holds tokens the rehearsal does not fill in: {sorted(set(left))}")
    return text


def upper_path(root: Path, path: str) -> Path:
    for directory, layer in OVERLAYS:
        if path.startswith(directory + "/"):
            return root / f"{layer}.up" / path[len(directory) + 1:]
    raise AzError(f"write_files path {path} is outside the VM's overlays")


def write_file(root: Path, entry: dict[str, Any]) -> None:
    target = upper_path(root, entry["path"])
    target.parent.mkdir(parents=True, exist_ok=True)
    content = entry.get("content", "")
    data = base64.b64decode(content) if entry.get("encoding") in ("b64", "base64") else content.encode()
    target.write_bytes(data)
    target.chmod(int(str(entry.get("permissions", "0644")), 8))


def in_vm(vm: dict[str, Any], argv: list[str]) -> list[str]:
    """A command line that runs argv inside the VM's network and mount namespaces."""
    return ["nsenter", "--target", str(vm["init"]), "--mount", "--net", "--",
            "env", "CLOISTER_SERVICE_MANAGER=direct", *argv]


def vm_pids(vm: dict[str, Any]) -> list[int]:
    out = run("ip", "netns", "pids", vm["namespace"], check=False).stdout
    return [int(p) for p in out.split()]


def stop_vm(vm: dict[str, Any]) -> None:
    """Stops every process of the VM: its node gets SIGTERM, then what is left SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = vm_pids(vm)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while vm_pids(vm) and time.time() < deadline:
            time.sleep(0.1)
    vm["power"] = "deallocated"


def delete_vm(vm: dict[str, Any]) -> None:
    stop_vm(vm)
    run("ip", "netns", "del", vm["namespace"], check=False)
    shutil.rmtree(vm["root"], ignore_errors=True)


# --- commands ---------------------------------------------------------------------------------


def group_of(state: dict[str, Any], name: str) -> dict[str, Any]:
    group = state["groups"].get(name)
    if group is None:
        raise AzError(f"(ResourceGroupNotFound) Resource group '{name}' could not be found.")
    return group


def read_parameters(spec: str) -> dict[str, Any]:
    if not spec.startswith("@"):
        raise AzError("the rehearsal's az takes --parameters @FILE only")
    document = json.loads(Path(spec[1:]).read_text())
    return {k: v["value"] for k, v in document["parameters"].items()}


def typed(value: Any) -> dict[str, Any]:
    kind = {bool: "Bool", int: "Int", str: "String", list: "Array", dict: "Object"}[type(value)]
    return {"type": kind, "value": value}


def deployment_create(state: dict[str, Any], a: argparse.Namespace) -> Any:
    group = group_of(state, a.resource_group)
    params = read_parameters(a.parameters)
    template_dir = Path(a.template_file).resolve().parent
    prefix = params.get("namePrefix", "cloister")
    count = int(params.get("nodeCount", 3))
    for i in range(count):
        name = f"{prefix}-node{i}"
        if name not in group["vms"]:
            group["vms"][name] = create_vm(a.resource_group, name, i, params, template_dir)
            save_state(state)
    nodes = [
        {"name": f"{prefix}-node{i}", "privateIp": cidr_host(9 + i), "publicHost": cidr_host(9 + i),
         "restUrl": f"https://{cidr_host(9 + i)}:{PORTS['httpsPort']}",
         "grpcUrl": f"https://{cidr_host(9 + i)}:{PORTS['grpcPort']}",
         "peerUrl": f"https://{cidr_host(9 + i)}:{PORTS['peerPort']}"}
        for i in range(count)
    ]
    group["deployments"][a.name] = {
        "name": a.name,
        "properties": {
            "provisioningState": "Succeeded",
            "parameters": {k: typed(v) for k, v in params.items()},
            "outputs": {"nodes": typed(nodes), "resourceGroupName": typed(a.resource_group)},
        },
    }
    return group["deployments"][a.name]


def run_command(state: dict[str, Any], a: argparse.Namespace) -> Any:
    group = group_of(state, a.resource_group)
    vm = group["vms"].get(a.name)
    if vm is None:
        raise AzError(f"(ResourceNotFound) The Resource 'Microsoft.Compute/virtualMachines/{a.name}' was not found.")
    if vm["power"] != "running":
        raise AzError(f"(OperationNotAllowed) Operation 'runCommand' is not allowed on VM '{a.name}' "
                      "since the VM is deallocated")
    if a.command_id != "RunShellScript":
        raise AzError(f"the rehearsal's az runs RunShellScript only, not {a.command_id}")
    script = "\n".join(a.scripts)
    # As the Azure CLI does: a parameter holding '=' is NAME=VALUE (the script sees an environment
    # variable), any other is the next positional argument.
    named = [p for p in a.parameters or [] if "=" in p]
    positional = [p for p in a.parameters or [] if "=" not in p]
    done = subprocess.run(in_vm(vm, ["env", *named, "bash", "-c", script, "run-command", *positional]),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    # Azure's Linux run-command reports success whatever the script's exit code.
    message = f"Enable succeeded: \n[stdout]\n{done.stdout}\n[stderr]\n{done.stderr}\n"
    return {"value": [{"code": "ProvisioningState/succeeded", "displayStatus": "Provisioning succeeded",
                       "level": "Info", "message": message, "time": None}]}


def emit(result: Any, query: str | None, output: str) -> None:
    if query:
        result = jmespath.search(query, result)
    if output == "none" or result is None:
        return
    if output == "tsv":
        rows = result if isinstance(result, list) else [result]
        for row in rows:
            cells = row if isinstance(row, list) else [row]
            print("\t".join("" if c is None else str(c) for c in cells))
    else:
        print(json.dumps(result, indent=2))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="az")
    p.add_argument("words", nargs="+")
    p.add_argument("--resource-group", "-g")
    p.add_argument("--name", "-n")
    p.add_argument("--location", "-l")
    p.add_argument("--template-file", "-f")
    p.add_argument("--parameters", "-p", nargs="+")
    p.add_argument("--command-id")
    p.add_argument("--scripts", nargs="+")
    p.add_argument("--query")
    p.add_argument("--output", "-o", default="json")
    p.add_argument("--yes", "-y", action="store_true")
    p.add_argument("--show-details", "-d", action="store_true")
    a = p.parse_args(argv)
    words = " ".join(a.words)
    state = load_state()
    if words == "account show":
        result: Any = {"name": "rehearsal", "user": {"name": "operator"}}
    elif words == "group create":
        state["groups"].setdefault(a.name, {"location": a.location, "vms": {}, "deployments": {}})
        result = {"name": a.name, "properties": {"provisioningState": "Succeeded"}}
    elif words == "deployment group create":
        a.parameters = a.parameters[0]
        result = deployment_create(state, a)
    elif words == "deployment group show":
        deployment = group_of(state, a.resource_group)["deployments"].get(a.name)
        if deployment is None:
            raise AzError(f"(DeploymentNotFound) Deployment '{a.name}' could not be found.")
        result = deployment
    elif words == "vm run-command invoke":
        result = run_command(state, a)
    elif words == "vm deallocate":
        vm = group_of(state, a.resource_group)["vms"].get(a.name)
        if vm is None:
            raise AzError(f"(ResourceNotFound) VM '{a.name}' was not found.")
        stop_vm(vm)
        result = None
    elif words == "vm list":
        vms = group_of(state, a.resource_group)["vms"].values()
        result = [{"name": vm["name"], "powerState": f"VM {vm['power']}"} for vm in vms]
    elif words == "vm show":
        vm = group_of(state, a.resource_group)["vms"].get(a.name)
        if vm is None:
            raise AzError(f"(ResourceNotFound) VM '{a.name}' was not found.")
        result = {"name": vm["name"], "powerState": f"VM {vm['power']}"}
    elif words == "group delete":
        group = group_of(state, a.name)
        for vm in group["vms"].values():
            delete_vm(vm)
        del state["groups"][a.name]
        result = None
    else:
        raise AzError(f"'{words}' is not a command the rehearsal's az knows")
    save_state(state)
    emit(result, a.query, a.output)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except AzError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)

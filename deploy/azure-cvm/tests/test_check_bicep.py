"""Tests of check_bicep.py: the real templates pass every rule, and a mutation of them aimed at each
rule is caught by that rule alone.

Run from the repository root: python3 -m unittest deploy/azure-cvm/tests/test_check_bicep.py
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

TESTS = Path(__file__).resolve().parent
AZURE_CVM = TESTS.parent
CLOUD_INIT = AZURE_CVM / "cloud-init.yaml"

_spec = importlib.util.spec_from_file_location("check_bicep", TESTS / "check_bicep.py")
assert _spec is not None and _spec.loader is not None
check_bicep = importlib.util.module_from_spec(_spec)
sys.modules["check_bicep"] = check_bicep  # dataclasses look their module up there
_spec.loader.exec_module(check_bicep)

# The tokens the templates fill in; stands in for cloud-init.yaml until that file exists.
TOKENS = [
    "NODE_NAME", "NODE_INDEX", "PRIVATE_IP", "JOIN_ADDRESS", "PUBLIC_HOST", "HTTPS_PORT", "GRPC_PORT",
    "PEER_PORT", "BINARY_URL", "BINARY_SHA256", "ATTESTATION", "APP", "SSH", "SERVICE_CA_B64", "MEMBERS_B64",
]

MAIN, NETWORK, NODE, INIT = "main.bicep", "modules/network.bicep", "modules/node.bicep", "cloud-init.yaml"
LAST_OUTPUT = "output resourceGroupName string = resourceGroup().name\n"
PEER_SOURCE = "sourceAddressPrefix: subnetPrefix"


def cloud_init_text() -> str:
    if CLOUD_INIT.is_file():
        return CLOUD_INIT.read_text()
    return "".join(f"X=__CLOISTER_{token}__\n" for token in TOKENS)


class Templates:
    """A temporary copy of deploy/azure-cvm's Bicep files and cloud-init, laid out as in the repo."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        for path in AZURE_CVM.rglob("*.bicep"):
            target = self.root / path.relative_to(AZURE_CVM)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        (self.root / INIT).write_text(cloud_init_text())

    def mutate(self, case: unittest.TestCase, name: str, old: str, new: str) -> None:
        path = self.root / name
        text = path.read_text()
        case.assertEqual(text.count(old), 1, f"the mutation target {old!r} must occur once in {name}")
        mutated = text.replace(old, new)
        case.assertNotEqual(mutated, text, "the mutation changed nothing")
        path.write_text(mutated)

    def check(self) -> tuple[list, list[str]]:
        return check_bicep.check(sorted(self.root.rglob("*.bicep")), self.root / INIT)


class RealTemplates(unittest.TestCase):
    def test_every_rule_holds(self) -> None:
        templates = Templates()
        self.addCleanup(templates.tmp.cleanup)
        violations, notes = templates.check()
        self.assertEqual([str(v) for v in violations], [])
        self.assertEqual(notes, [], "every rule ran, tokens included")

    def test_the_repository_files_pass_from_the_command_line(self) -> None:
        run = subprocess.run([sys.executable, str(TESTS / "check_bicep.py")], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        self.assertEqual(run.stdout, "")

    def test_the_node_module_loads_the_cloud_init_of_the_repository(self) -> None:
        node = check_bicep.BicepFile(AZURE_CVM / NODE, (AZURE_CVM / NODE).read_bytes())
        self.assertTrue(check_bicep.loads(node, CLOUD_INIT))

    def test_tokens_are_skipped_with_a_note_when_cloud_init_is_absent(self) -> None:
        templates = Templates()
        self.addCleanup(templates.tmp.cleanup)
        (templates.root / INIT).unlink()
        violations, notes = templates.check()
        self.assertEqual(violations, [])
        self.assertEqual(len(notes), 1)
        self.assertIn("tokens: skipped", notes[0])


class Mutations(unittest.TestCase):
    def caught(self, rule: str, *mutations: tuple[str, str, str]) -> list:
        templates = Templates()
        self.addCleanup(templates.tmp.cleanup)
        for name, old, new in mutations:
            templates.mutate(self, name, old, new)
        violations, _notes = templates.check()
        self.assertEqual({v.rule for v in violations}, {rule}, "\n".join(map(str, violations)))
        return violations

    # confidential-vm
    def test_vm_without_confidential_security_type(self) -> None:
        self.caught("confidential-vm", (NODE, "      securityType: 'ConfidentialVM'\n", ""))

    def test_trusted_launch_vm(self) -> None:
        self.caught("confidential-vm", (NODE, "'ConfidentialVM'", "'TrustedLaunch'"))

    def test_secure_boot_off(self) -> None:
        self.caught("confidential-vm", (NODE, "secureBootEnabled: true", "secureBootEnabled: false"))

    def test_vtpm_dropped(self) -> None:
        self.caught("confidential-vm", (NODE, "        vTpmEnabled: true\n", ""))

    def test_os_disk_encryption_dropped(self) -> None:
        self.caught("confidential-vm", (NODE, "            securityEncryptionType: osDiskEncryption\n", ""))

    def test_os_disk_encryption_literal_outside_the_confidential_set(self) -> None:
        self.caught("confidential-vm", (NODE, "securityEncryptionType: osDiskEncryption",
                                        "securityEncryptionType: 'NonPersistedTPM'"))

    def test_os_disk_encryption_parameter_allowing_non_persisted_tpm(self) -> None:
        violations = self.caught("confidential-vm", (NODE, "  'VMGuestStateOnly'\n])",
                                                     "  'VMGuestStateOnly'\n  'NonPersistedTPM'\n])"))
        self.assertIn("NonPersistedTPM", violations[0].message)

    # peer-port
    def test_peer_port_open_to_everyone(self) -> None:
        self.caught("peer-port", (NETWORK, PEER_SOURCE, "sourceAddressPrefix: '*'"))

    def test_peer_port_open_to_clients(self) -> None:
        self.caught("peer-port", (NETWORK, PEER_SOURCE, "sourceAddressPrefix: clientSourcePrefix"))

    def test_peer_port_open_to_the_virtual_network(self) -> None:
        self.caught("peer-port", (NETWORK, PEER_SOURCE, "sourceAddressPrefix: 'VirtualNetwork'"))

    def test_peer_port_with_extra_source_prefixes(self) -> None:
        self.caught("peer-port", (NETWORK, PEER_SOURCE, PEER_SOURCE + "\n      sourceAddressPrefixes: [\n"
                                                        "        '0.0.0.0/0'\n      ]"))

    def test_client_rule_naming_the_peer_port(self) -> None:
        self.caught("peer-port", (NETWORK, "string(grpcPort)", "string(peerPort)"))

    def test_client_rule_with_a_range_covering_the_peer_port(self) -> None:
        self.caught("peer-port", (NETWORK, "string(grpcPort)", "'8001-8002'"))

    def test_ssh_rule_opening_every_port(self) -> None:
        self.caught("peer-port", (NETWORK, "destinationPortRange: '22'", "destinationPortRange: '*'"))

    # secret-output
    def test_output_named_like_a_password(self) -> None:
        self.caught("secret-output", (MAIN, LAST_OUTPUT, LAST_OUTPUT +
                                      "\noutput adminPassword string = 'cloister-${uniqueString(resourceGroup().id)}'\n"))

    def test_output_of_a_secure_parameter(self) -> None:
        self.caught("secret-output", (MAIN, LAST_OUTPUT, LAST_OUTPUT + "\n@secure()\nparam bootstrapKey string\n\n"
                                      "var bootstrap = 'key=${bootstrapKey}'\n\noutput bootstrapLine string = bootstrap\n"))

    def test_output_of_list_keys(self) -> None:
        self.caught("secret-output", (MAIN, LAST_OUTPUT, LAST_OUTPUT + "\noutput diagnostics string = listKeys("
                                      "resourceId('Microsoft.Storage/storageAccounts', 'diag'), '2023-05-01').keys[0].value\n"))

    # secret-param
    def test_token_parameter_without_secure(self) -> None:
        self.caught("secret-param", (MAIN, LAST_OUTPUT, LAST_OUTPUT + "\n@description('x')\nparam apiToken string\n"))

    def test_secure_password_parameter_passes(self) -> None:
        templates = Templates()
        self.addCleanup(templates.tmp.cleanup)
        templates.mutate(self, MAIN, LAST_OUTPUT, LAST_OUTPUT + "\n@secure()\nparam adminPassword string\n")
        self.assertEqual(templates.check()[0], [])

    # parse
    def test_dangling_parameter_default(self) -> None:
        self.caught("parse", (MAIN, "param nodeCount int = 3", "param nodeCount int ="))

    def test_unclosed_call(self) -> None:
        self.caught("parse", (MAIN, "toLower('${namePrefix}-node${i}-${dnsSuffix}')",
                              "toLower('${namePrefix}-node${i}-${dnsSuffix}'"))

    # tokens
    def test_token_missing_from_the_replace_chain(self) -> None:
        violations = self.caught("tokens", (NODE, "replace(cloudInitTemplate, '__CLOISTER_NODE_NAME__', name)",
                                            "cloudInitTemplate"))
        self.assertEqual([v.path.name for v in violations], [INIT])
        self.assertIn("__CLOISTER_NODE_NAME__", violations[0].message)

    def test_token_new_in_cloud_init(self) -> None:
        text = cloud_init_text()
        self.caught("tokens", (INIT, text, text + "# __CLOISTER_NEW_SETTING__\n"))

    def test_replaced_token_that_cloud_init_lacks(self) -> None:
        text = cloud_init_text()
        violations = self.caught("tokens", (INIT, text, text.replace("__CLOISTER_ATTESTATION__", "azure-vtpm")))
        self.assertEqual([v.path.name for v in violations], ["node.bicep"])

    def test_command_line_reports_one_line_per_violation_and_fails(self) -> None:
        templates = Templates()
        self.addCleanup(templates.tmp.cleanup)
        templates.mutate(self, NETWORK, PEER_SOURCE, "sourceAddressPrefix: '*'")
        templates.mutate(self, NODE, "secureBootEnabled: true", "secureBootEnabled: false")
        files = [str(p) for p in sorted(templates.root.rglob("*.bicep"))]
        run = subprocess.run([sys.executable, str(TESTS / "check_bicep.py"), "--cloud-init",
                              str(templates.root / INIT), *files], capture_output=True, text=True)
        self.assertEqual(run.returncode, 1, run.stderr)
        lines = run.stdout.splitlines()
        self.assertEqual(len(lines), 2, run.stdout)
        found = [re.fullmatch(r"(\S+\.bicep):(\d+): ([a-z-]+): .+", line) for line in lines]
        self.assertTrue(all(found), run.stdout)
        self.assertEqual(sorted(m.group(3) for m in found if m), ["confidential-vm", "peer-port"])


if __name__ == "__main__":
    unittest.main()

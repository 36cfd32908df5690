"""The deployment scripts' contract, without Azure: --help, refusal of every missing or malformed
parameter before any `az` command runs (naming the parameter), and dry runs that print the `az`
commands instead of running them.

Run from the repository root: python3 -m unittest discover -s deploy/azure-cvm/tests
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import unittest
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
CLOUD_INIT = SCRIPTS.parent / "cloud-init.yaml"
SHA = "ab" * 32


class ScriptTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        # An `az` that records every call: nothing may reach it before the checks pass.
        self.calls = self.dir / "az-calls"
        self.az = self.dir / "az"
        self.az.write_text(f'#!/bin/sh\necho "$@" >> {self.calls}\n')
        self.az.chmod(self.az.stat().st_mode | stat.S_IEXEC)
        for name in ("ca.cert.pem", "m0.cert.pem", "m1.cert.pem"):
            (self.dir / name).write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        (self.dir / "ca.key.pem").write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
        (self.dir / "with-key.pem").write_text((self.dir / "m0.cert.pem").read_text() + (self.dir / "ca.key.pem").read_text())
        (self.dir / "ssh.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake rehearsal\n")

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def run_script(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, CLOISTER_AZ=str(self.az), CLOISTER="cloister")
        return subprocess.run(["bash", str(SCRIPTS / script), *args], capture_output=True, text=True,
                              env=env, cwd=self.dir, timeout=60)

    def az_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def deploy_args(self, **override: str) -> list[str]:
        values = {
            "--resource-group": "rg-test", "--location": "westeurope", "--client-source": "203.0.113.0/24",
            "--binary-url": "https://example.org/cloister", "--binary-sha256": SHA,
            "--ca-cert": str(self.dir / "ca.cert.pem"), "--ca-key": str(self.dir / "ca.key.pem"),
            "--member-cert": str(self.dir / "m0.cert.pem"), "--ssh-public-key": str(self.dir / "ssh.pub"),
        }
        values.update(override)
        args: list[str] = []
        for key, value in values.items():
            if value is not None:
                args += [key, value]
        return args

    def assert_refused(self, result: subprocess.CompletedProcess[str], option: str) -> None:
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(option, result.stderr)
        self.assertEqual(self.az_calls(), [], "az ran before the parameters were checked")

    def test_every_script_has_help_and_strict_mode(self) -> None:
        for script in ("deploy.sh", "add-node.sh", "retire-node.sh", "destroy.sh"):
            with self.subTest(script=script):
                text = (SCRIPTS / script).read_text()
                self.assertIn("set -euo pipefail", text)
                result = self.run_script(script, "--help")
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("Usage:", result.stdout)
                self.assertIn("--dry-run", result.stdout)
                self.assert_refused(self.run_script(script, "--no-such-option"), "--no-such-option")

    def test_deploy_refuses_missing_parameters_by_name(self) -> None:
        for option in ("--resource-group", "--location", "--client-source", "--binary-url", "--binary-sha256",
                       "--ca-cert", "--ca-key", "--ssh-public-key", "--member-cert"):
            with self.subTest(option=option):
                args = self.deploy_args(**{option: None})
                self.assert_refused(self.run_script("deploy.sh", *args), option)

    def test_deploy_refuses_malformed_parameters_by_name(self) -> None:
        cases = [
            ("--node-count", "0"), ("--node-count", "16"), ("--node-count", "three"), ("--node-count", "-1"),
            ("--vm-size", "Standard_D2s_v5"), ("--vm-size", "Standard_DC2s_v3"), ("--vm-size", ""),
            ("--client-source", "10.0.0.0/33"), ("--client-source", "300.1.1.1/24"),
            ("--client-source", "anywhere"), ("--client-source", "10.0.0.1"),
            ("--binary-url", "ftp://example.org/cloister"), ("--binary-url", "example.org/cloister"),
            ("--binary-sha256", "ab" * 31), ("--binary-sha256", "zz" * 32), ("--binary-sha256", SHA + "0"),
            ("--resource-group", "Bad Name"), ("--app", "wallet"),
            ("--binary-url", "https://example.org/c'loister"), ("--node-count", "03"),
            ("--ca-cert", "/no/such/file"), ("--member-cert", str(self.dir / "ca.key.pem")),
            # A certificate file with a private key appended: nothing secret goes to Azure.
            ("--member-cert", str(self.dir / "with-key.pem")), ("--ca-cert", str(self.dir / "with-key.pem")),
        ]
        for option, value in cases:
            with self.subTest(option=option, value=value):
                args = self.deploy_args(**{option: value})
                self.assert_refused(self.run_script("deploy.sh", *args), option)

    def test_deploy_dry_run_prints_the_az_commands_and_runs_none(self) -> None:
        result = self.run_script("deploy.sh", *self.deploy_args(), "--node-count", "5", "--dry-run")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.az_calls(), [])
        printed = result.stderr
        self.assertIn("group create --name rg-test --location westeurope", printed)
        self.assertIn("deployment group create --resource-group rg-test --name cloister --template-file", printed)
        self.assertIn("main.bicep", printed)
        self.assertIn("vm run-command invoke", printed)
        self.assertIn("ca sign", printed)
        self.assertIn("activate.sh", printed)

    def test_add_retire_and_destroy_check_and_dry_run(self) -> None:
        ca = ["--ca-cert", str(self.dir / "ca.cert.pem"), "--ca-key", str(self.dir / "ca.key.pem")]
        self.assert_refused(self.run_script("add-node.sh", *ca), "--resource-group")
        self.assert_refused(self.run_script("add-node.sh", "--resource-group", "rg", *ca, "--count", "0"), "--count")
        self.assert_refused(self.run_script("add-node.sh", "--resource-group", "rg", "--ca-cert",
                                            str(self.dir / "ca.cert.pem")), "--ca-key")
        added = self.run_script("add-node.sh", "--resource-group", "rg", *ca, "--dry-run")
        self.assertEqual(added.returncode, 0, added.stderr)
        self.assertIn("deployment group create", added.stderr)

        member = ["--member-cert", str(self.dir / "m0.cert.pem"), "--member-key", str(self.dir / "ca.key.pem")]
        self.assert_refused(self.run_script("retire-node.sh", "--resource-group", "rg", *member), "--node")
        self.assert_refused(self.run_script("retire-node.sh", "--resource-group", "rg", "--node", "n"), "--member-cert")
        self.assert_refused(self.run_script("retire-node.sh", "--resource-group", "rg", "--node", "Node 2", *member),
                            "--node")
        retired = self.run_script("retire-node.sh", "--resource-group", "rg", "--node", "cloister-node2", *member,
                                  "--dry-run")
        self.assertEqual(retired.returncode, 0, retired.stderr)
        # Governance first, then deallocation.
        self.assertLess(retired.stderr.index("remove_node"), retired.stderr.index("vm deallocate"))

        self.assert_refused(self.run_script("destroy.sh"), "--resource-group")
        destroyed = self.run_script("destroy.sh", "--resource-group", "rg", "--dry-run")
        self.assertEqual(destroyed.returncode, 0, destroyed.stderr)
        self.assertIn("group delete --name rg --yes", destroyed.stderr)
        self.assertEqual(self.az_calls(), [])


class CloudInitScriptTest(unittest.TestCase):
    """The scripts cloud-init.yaml carries pass ShellCheck, as the operator's scripts do (CI
    installs shellcheck; elsewhere this test is skipped, saying so)."""

    @unittest.skipUnless(shutil.which("shellcheck"), "shellcheck is not installed")
    def test_embedded_scripts_pass_shellcheck(self) -> None:
        files = [f for f in yaml.safe_load(CLOUD_INIT.read_text())["write_files"] if f["path"].endswith(".sh")]
        self.assertEqual({Path(f["path"]).name for f in files}, {"bootstrap.sh", "activate.sh"})
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for f in files:
                path = Path(tmp) / Path(f["path"]).name
                path.write_text(f["content"])
                paths.append(str(path))
            result = subprocess.run(["shellcheck", "-S", "warning", *paths], capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stdout)


if __name__ == "__main__":
    unittest.main()

#!/usr/bin/env python3
"""Static checks of the Azure confidential-VM Bicep templates, over their tree-sitter syntax trees.

Usage: check_bicep.py [--cloud-init PATH] [FILE ...]   (default: every .bicep under deploy/azure-cvm)
Exit status 0 when every rule holds; 1 with one `file:line: rule: message` line per violation.

Rules, and what each guards against:
  parse            ERROR or MISSING nodes: a template Azure would reject, or one the other rules
                   would misread.
  confidential-vm  A VM that is not an SEV-SNP confidential VM (security type, Secure Boot, vTPM,
                   confidential OS disk encryption): the nodes' attestation, and so the network's
                   trust, would rest on an ordinary VM.
  peer-port        An NSG rule that opens the node-to-node port to anything but the nodes' subnet
                   ('*', 'Internet', 'VirtualNetwork', the clients' range, ...).
  secret-output    A secret in the deployment outputs, which anyone with read access to the
                   deployment history can see.
  secret-param     A secret-looking parameter without @secure(), whose value would be logged in
                   the deployment history.
  tokens           A `__CLOISTER_*__` token of cloud-init.yaml that no replace() fills in (the node
                   would run with the placeholder), or a replace() of a token cloud-init.yaml lacks.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import tree_sitter_bicep
from tree_sitter import Language, Node, Parser

AZURE_CVM = Path(__file__).resolve().parent.parent
DEFAULT_CLOUD_INIT = AZURE_CVM / "cloud-init.yaml"
SECRET_NAME = re.compile(r"password|secret|token|privatekey|private_key|connectionstring|sas|credential", re.I)
TOKEN = re.compile(r"__CLOISTER_[A-Z0-9_]+__")
CVM_ENCRYPTION = frozenset({"DiskWithVMGuestState", "VMGuestStateOnly"})
# The peer port when no checked file declares a `peerPort` parameter with a default.
DEFAULT_PEER_PORT = 8002
ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'", "$": "$"}

PARSER = Parser(Language(tree_sitter_bicep.language()))


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{display(self.path)}:{self.line}: {self.rule}: {self.message}"


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def line(node: Node) -> int:
    return node.start_point[0] + 1


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def parts(node: Node) -> list[Node]:
    """The named children, without comments: array items, call arguments, object properties."""
    return [c for c in node.named_children if c.type != "comment"]


def unwrap(node: Optional[Node]) -> Optional[Node]:
    while node is not None and node.type == "parenthesized_expression":
        node = parts(node)[0] if parts(node) else None
    return node


def after_equals(decl: Node) -> Optional[Node]:
    """The value of a `param`/`var`/`output`/`resource` declaration: what follows its `=`."""
    seen = False
    for child in decl.children:
        if seen and child.is_named and child.type != "comment":
            return child
        seen = seen or child.type == "="
    return None


def string_pieces(node: Node) -> list[Union[str, Node]]:
    """A string literal's text pieces, with the expression of each `${...}` left as a node."""
    pieces: list[Union[str, Node]] = []
    for child in node.named_children:
        text = child.text.decode()
        if child.type == "interpolation":
            pieces += parts(child)[:1]
        else:
            pieces.append(ESCAPES.get(text[1:], text) if child.type == "escape_sequence" else text)
    return pieces


def string_value(node: Optional[Node]) -> Optional[str]:
    """A string literal's value; None for anything else, interpolated strings included."""
    node = unwrap(node)
    if node is None or node.type != "string":
        return None
    texts = [p for p in string_pieces(node) if isinstance(p, str)]
    return "".join(texts) if len(texts) == len(string_pieces(node)) else None


def function_name(call: Node) -> str:
    """`replace` for both `replace(...)` and `sys.replace(...)`; `listKeys` for `st.listKeys()`."""
    function = call.child_by_field_name("function")
    if function is None:
        return ""
    if function.type == "member_expression":
        function = function.child_by_field_name("property")
    return function.text.decode() if function is not None else ""


def arguments(call: Node) -> list[Node]:
    args = call.child_by_field_name("arguments")
    return parts(args) if args is not None else []


def is_key(node: Node) -> bool:
    """Whether an identifier is an object key (`{ name: ... }`) rather than a reference."""
    parent = node.parent
    return parent is not None and parent.type == "object_property" and parts(parent)[0] == node


def references(node: Node, name: str) -> bool:
    return any(n.type == "identifier" and n.text.decode() == name and not is_key(n) for n in walk(node))


class BicepFile:
    def __init__(self, path: Path, source: bytes) -> None:
        self.path = path
        self.root = PARSER.parse(source).root_node
        self.params: dict[str, Node] = {}
        self.decorators: dict[str, list[Node]] = {}
        self.vars: dict[str, Node] = {}
        self.outputs: list[Node] = []
        pending: list[Node] = []
        for child in parts(self.root):
            if child.type == "decorators":
                pending += [c for c in parts(child) if c.type == "decorator"]
                continue
            name = next((c.text.decode() for c in child.named_children if c.type == "identifier"), "")
            if child.type == "parameter_declaration":
                self.params[name], self.decorators[name] = child, pending
            elif child.type == "variable_declaration" and (value := after_equals(child)) is not None:
                self.vars[name] = value
            elif child.type == "output_declaration":
                self.outputs.append(child)
            pending = []

    def decorator(self, param: str, name: str) -> Optional[Node]:
        """The call inside `@name(...)` on a parameter, if there is one."""
        for decorator in self.decorators.get(param, []):
            call = next((c for c in decorator.named_children if c.type == "call_expression"), None)
            if call is not None and function_name(call) == name:
                return call
        return None

    def deref(self, node: Optional[Node], depth: int = 0) -> Optional[Node]:
        """Follows a reference to a variable of this file to the variable's value."""
        node = unwrap(node)
        if node is not None and node.type == "identifier" and depth < 20:
            value = self.vars.get(node.text.decode())
            if value is not None:
                return self.deref(value, depth + 1)
        return node

    def prop(self, obj: Optional[Node], *path: str) -> Optional[Node]:
        """The value at `path` in an object literal, through variable references; None if absent."""
        for key in path:
            obj = self.deref(obj)
            if obj is None or obj.type != "object":
                return None
            found = None
            for pair in parts(obj):
                if pair.type != "object_property" or len(parts(pair)) < 2:
                    continue
                name = parts(pair)[0]
                text = string_value(name) if name.type == "string" else name.text.decode()
                if text == key:
                    found = parts(pair)[-1]
            obj = found
        return self.deref(obj)

    def items(self, node: Optional[Node], depth: int = 0) -> Iterator[Node]:
        """The elements an array expression may hold, through concat(), ?:, variables and loops."""
        node = self.deref(node)
        if node is None or depth > 20:
            return
        if node.type == "array":
            for item in parts(node):
                yield self.deref(item) or item
        elif node.type == "call_expression" and function_name(node) in ("concat", "union"):
            for arg in arguments(node):
                yield from self.items(arg, depth + 1)
        elif node.type == "ternary_expression":
            for field in ("consequence", "alternative"):
                yield from self.items(node.child_by_field_name(field), depth + 1)
        elif node.type == "for_statement" and (body := node.child_by_field_name("body")) is not None:
            yield self.deref(body) or body

    def resources(self) -> Iterator[tuple[Node, str, Optional[Node]]]:
        """(declaration, full type without API version, body object) of every declared resource."""
        for decl in walk(self.root):
            if decl.type != "resource_declaration" or any(c.type == "existing" for c in decl.children):
                continue
            types = []
            ancestor: Optional[Node] = decl
            while ancestor is not None:
                if ancestor.type == "resource_declaration":
                    type_node = next((c for c in ancestor.named_children if c.type == "string"), None)
                    types.insert(0, (string_value(type_node) or "").split("@")[0])
                ancestor = ancestor.parent
            body = after_equals(decl)
            while body is not None and body.type in ("for_statement", "if_statement"):
                inner = body.child_by_field_name("body") if body.type == "for_statement" else None
                body = inner or next((c for c in parts(body) if c.type in ("object", "if_statement")), None)
            yield decl, "/".join(types).lower(), body

    def const(self, node: Optional[Node], depth: int = 0) -> Union[int, str, None]:
        """The value of a constant expression, taking parameters at their defaults."""
        node = unwrap(node)
        if node is None or depth > 20:
            return None
        if node.type == "number":
            return int(node.text.decode())
        if node.type == "string":
            values = [p if isinstance(p, str) else self.const(p, depth + 1) for p in string_pieces(node)]
            return None if None in values else "".join(map(str, values))
        if node.type == "identifier":
            name = node.text.decode()
            if name in self.vars:
                return self.const(self.vars[name], depth + 1)
            if name in self.params:
                return self.const(after_equals(self.params[name]), depth + 1)
            return None
        if node.type == "call_expression" and function_name(node) == "string" and len(arguments(node)) == 1:
            value = self.const(arguments(node)[0], depth + 1)
            return None if value is None else str(value)
        return None


def check_parse(f: BicepFile, node: Optional[Node] = None) -> list[Violation]:
    node = node or f.root
    if node.is_error:  # one report per unparsable stretch, not one per node inside it
        return [Violation(f.path, line(node), "parse", f"syntax error at {node.text.decode()[:40]!r}")]
    found = [Violation(f.path, line(node), "parse", f"missing {node.type!r}")] if node.is_missing else []
    return found + [v for child in node.children for v in check_parse(f, child)]


def check_confidential_vm(f: BicepFile) -> list[Violation]:
    found = []
    for decl, rtype, body in f.resources():
        if rtype != "microsoft.compute/virtualmachines":
            continue

        def fail(node: Optional[Node], message: str) -> None:
            found.append(Violation(f.path, line(node or decl), "confidential-vm", message))

        security_type = f.prop(body, "properties", "securityProfile", "securityType")
        if string_value(security_type) != "ConfidentialVM":
            fail(security_type, "properties.securityProfile.securityType must be 'ConfidentialVM'")
        for setting in ("secureBootEnabled", "vTpmEnabled"):
            value = f.prop(body, "properties", "securityProfile", "uefiSettings", setting)
            if value is None or value.type != "boolean" or value.text != b"true":
                fail(value, f"properties.securityProfile.uefiSettings.{setting} must be true")
        where = "properties.storageProfile.osDisk.managedDisk.securityProfile.securityEncryptionType"
        encryption = f.prop(body, *where.split("."))
        literal = string_value(encryption)
        if encryption is None:
            fail(None, f"{where} is missing: the OS disk is not a confidential disk")
        elif literal is not None:
            if literal not in CVM_ENCRYPTION:
                fail(encryption, f"{where} is {literal!r}, not one of {sorted(CVM_ENCRYPTION)}")
        elif encryption.type == "identifier" and encryption.text.decode() in f.params:
            param = encryption.text.decode()
            allowed = f.decorator(param, "allowed")
            values = [string_value(v) for v in f.items(arguments(allowed)[0])] if allowed and arguments(allowed) else []
            if not values or not set(values) <= CVM_ENCRYPTION:
                fail(f.params[param], f"parameter {param} feeds {where}, so its @allowed values must all be "
                     f"in {sorted(CVM_ENCRYPTION)}; they are {values or 'unrestricted'}")
        else:
            fail(encryption, f"{where} must be a literal or a parameter with a restricted @allowed list")
    return found


def nsg_rules(f: BicepFile) -> Iterator[Node]:
    """The `properties` object of every NSG security rule declared in the file."""
    for _decl, rtype, body in f.resources():
        if rtype == "microsoft.network/networksecuritygroups":
            for rule in f.items(f.prop(body, "properties", "securityRules")):
                if (props := f.prop(rule, "properties")) is not None:
                    yield props
        elif rtype == "microsoft.network/networksecuritygroups/securityrules":
            if (props := f.prop(body, "properties")) is not None:
                yield props


def port_includes(f: BicepFile, port: Node, peer_ports: set[int]) -> bool:
    if references(port, "peerPort"):
        return True
    value = f.const(port)
    if value is None:
        return False
    text = str(value).strip()
    if text == "*":
        return True
    low, _, high = text.partition("-")
    try:
        return any(int(low) <= p <= int(high or low) for p in peer_ports)
    except ValueError:
        return False


def check_peer_port(f: BicepFile, peer_ports: set[int]) -> list[Violation]:
    found = []
    for props in nsg_rules(f):
        direction = string_value(f.prop(props, "direction"))
        access = string_value(f.prop(props, "access"))
        if (direction or "").lower() == "outbound" or (access or "").lower() == "deny":
            continue
        ports = [p for p in [f.prop(props, "destinationPortRange")] if p is not None]
        ports += list(f.items(f.prop(props, "destinationPortRanges")))
        if not any(port_includes(f, p, peer_ports) for p in ports):
            continue
        source = f.prop(props, "sourceAddressPrefix")
        if source is None or source.type != "identifier" or source.text != b"subnetPrefix":
            shown = source.text.decode() if source is not None else "nothing"
            found.append(Violation(f.path, line(source or props), "peer-port",
                                   f"an inbound rule opens the peer port to {shown}; its source must be subnetPrefix"))
        sources = f.prop(props, "sourceAddressPrefixes")
        if sources is not None and list(f.items(sources)) != []:
            found.append(Violation(f.path, line(sources), "peer-port",
                                   "an inbound rule on the peer port has sourceAddressPrefixes; use subnetPrefix only"))
    return found


def check_secret_output(f: BicepFile) -> list[Violation]:
    found = []
    secure = {p for p in f.params if f.decorator(p, "secure") is not None}
    for output in f.outputs:
        name = next((c.text.decode() for c in output.named_children if c.type == "identifier"), "")
        if SECRET_NAME.search(name):
            found.append(Violation(f.path, line(output), "secret-output", f"output {name} is named like a secret"))
        value = after_equals(output)
        pending, seen = [value] if value is not None else [], set()
        while pending:
            node = pending.pop()
            for n in walk(node):
                if n.type == "call_expression" and function_name(n).startswith("list"):
                    found.append(Violation(f.path, line(n), "secret-output",
                                           f"output {name} calls {function_name(n)}(), which returns secrets"))
                elif n.type == "identifier" and not is_key(n):
                    ref = n.text.decode()
                    if ref in secure:
                        found.append(Violation(f.path, line(n), "secret-output",
                                               f"output {name} reveals the @secure() parameter {ref}"))
                    elif ref in f.vars and ref not in seen:
                        seen.add(ref)
                        pending.append(f.vars[ref])
    return found


def check_secret_param(f: BicepFile) -> list[Violation]:
    return [
        Violation(f.path, line(decl), "secret-param", f"parameter {name} looks like a secret but is not @secure()")
        for name, decl in f.params.items()
        if SECRET_NAME.search(name) and "public" not in name.lower() and f.decorator(name, "secure") is None
    ]


def loads(f: BicepFile, text_file: Path) -> bool:
    """Whether the file calls loadTextContent() on `text_file`."""
    return any(
        n.type == "call_expression" and function_name(n) == "loadTextContent" and arguments(n)
        and (path := string_value(arguments(n)[0])) is not None
        and (f.path.parent / path).resolve() == text_file.resolve()
        for n in walk(f.root)
    )


def check_tokens(files: list[BicepFile], cloud_init: Path) -> list[Violation]:
    replaced: dict[str, tuple[Path, int]] = {}
    for f in files:
        for n in walk(f.root):
            if n.type == "call_expression" and function_name(n) == "replace" and len(arguments(n)) >= 2:
                token = string_value(arguments(n)[1])
                if token is not None and TOKEN.fullmatch(token):
                    replaced.setdefault(token, (f.path, line(n)))
    wanted: dict[str, int] = {}
    for number, text in enumerate(cloud_init.read_text().splitlines(), start=1):
        for token in TOKEN.findall(text):
            wanted.setdefault(token, number)
    found = [Violation(cloud_init, number, "tokens", f"{token} is never replaced: no Bicep file passes it to replace()")
             for token, number in wanted.items() if token not in replaced]
    found += [Violation(path, number, "tokens", f"replace() fills in {token}, which {cloud_init.name} does not contain")
              for token, (path, number) in replaced.items() if token not in wanted]
    return found


def check(paths: list[Path], cloud_init: Optional[Path] = None) -> tuple[list[Violation], list[str]]:
    """Every violation in the files, and notes (rules skipped and why)."""
    cloud_init = cloud_init or DEFAULT_CLOUD_INIT
    files = [BicepFile(p, p.read_bytes()) for p in paths]
    defaults = [f.const(after_equals(f.params["peerPort"])) for f in files if "peerPort" in f.params]
    peer_ports = {v for v in defaults if isinstance(v, int)} or {DEFAULT_PEER_PORT}
    violations: list[Violation] = []
    for f in files:
        broken = check_parse(f)
        violations += broken
        if broken:
            continue  # the other rules would read a guessed tree
        violations += check_confidential_vm(f) + check_peer_port(f, peer_ports)
        violations += check_secret_output(f) + check_secret_param(f)
    notes = []
    if not cloud_init.is_file():
        notes.append(f"tokens: skipped, {display(cloud_init)} does not exist yet")
    elif not any(loads(f, cloud_init) for f in files):
        notes.append(f"tokens: skipped, none of the files checked loads {display(cloud_init)}")
    else:
        violations += check_tokens(files, cloud_init)
    return violations, notes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="Bicep files (default: every .bicep under deploy/azure-cvm)")
    parser.add_argument("--cloud-init", type=Path, default=DEFAULT_CLOUD_INIT, help="the cloud-init template")
    args = parser.parse_args(argv)
    paths = args.files or sorted(AZURE_CVM.rglob("*.bicep"))
    if not paths or not all(p.is_file() for p in paths):
        print(f"no such Bicep files: {[str(p) for p in paths if not p.is_file()] or AZURE_CVM}", file=sys.stderr)
        return 1
    violations, notes = check(paths, args.cloud_init)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for violation in violations:
        print(violation)
    if not violations:
        print(f"{len(paths)} Bicep files: every rule holds", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())

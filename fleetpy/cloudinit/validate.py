"""Check #cloud-config user-data and report every problem with its line and column."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import yaml

from fleetpy.cloudinit.schema import (
    COREOS,
    ENCODINGS,
    ROOT,
    WRITE_FILE,
    Severity,
    Spec,
    decode_content,
    normalize_key,
)

HEADER = "#cloud-config"

_TAG = "tag:yaml.org,2002:"
# What each YAML scalar type is called in messages.
_SCALAR_NAMES = {
    _TAG + "str": "string",
    _TAG + "int": "integer",
    _TAG + "float": "number",
    _TAG + "bool": "boolean",
    _TAG + "null": "null",
    _TAG + "timestamp": "timestamp",
}
_KIND_NAMES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "list": "list",
    "map": "mapping",
}
# Like coreos-cloudinit, a string option takes any scalar (its text is used as written,
# so "reboot-strategy: off" stays "off"); numbers and booleans must be typed as such.
_ACCEPTS = {
    "str": {"string", "integer", "number", "boolean", "timestamp"},
    "int": {"integer"},
    "float": {"integer", "number"},
    "bool": {"boolean"},
}


@dataclass(frozen=True)
class Finding:
    """One problem in the user-data; line and column are 1-based."""

    line: int
    column: int
    severity: Severity
    message: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the finding's fields."""
        return asdict(self)


Entries = dict[str, tuple[yaml.ScalarNode, yaml.Node]]


def validate(text: str) -> list[Finding]:
    """Every problem in the cloud-config `text`, in order of position."""
    return read(text)[0]


def read(text: str) -> tuple[list[Finding], yaml.SafeLoader | None, yaml.Node | None]:
    """validate()'s findings, with the loader and the root node they were read from, so that a
    caller builds values without parsing the text again. The loader is None when the text is not
    YAML at all; the node is None for an empty document."""
    findings: list[Finding] = []
    first_line = text.split("\n", 1)[0]
    # Trailing whitespace (including the \r of CRLF files) is tolerated, as by coreos-cloudinit.
    if first_line.rstrip() != HEADER:
        findings.append(Finding(1, 1, "error", f'user-data must begin with a "{HEADER}" line'))
    # The rest is still checked so that one run shows every problem.
    try:
        # The reader rejects control characters as soon as it is created.
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        column = err.position - (text.rfind("\n", 0, err.position) + 1) + 1
        findings.append(
            Finding(line, column, "error", f"character #x{err.character:04x} is not allowed in YAML")
        )
        return sorted(findings, key=_position), None, None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        findings.append(
            Finding(mark.line + 1, mark.column + 1, "error", f"YAML syntax error: {_yaml_problem(err)}")
        )
        return sorted(findings, key=_position), None, None
    if root is not None:
        validator = _Validator(loader)
        if isinstance(root, yaml.MappingNode):
            validator.check(root, ROOT, "")
        elif not _is_null(root):
            validator.report(
                root,
                "error",
                f"expected a mapping of keys at the top level, got {_node_name(root)}",
            )
        findings.extend(validator.findings)
    return sorted(findings, key=_position), loader, root


def _position(finding: Finding) -> tuple[int, int]:
    return finding.line, finding.column


def _yaml_problem(err: yaml.MarkedYAMLError) -> str:
    if err.context and err.problem:
        # PyYAML phrases some problems as the second half of a sentence ("but found ...").
        if err.problem.startswith("but "):
            return f"{err.context}, {err.problem}"
        return f"{err.problem} ({err.context})"
    return err.problem or err.context or "invalid YAML"


class _Validator:
    def __init__(self, loader: yaml.SafeLoader) -> None:
        self.loader = loader
        self.findings: list[Finding] = []

    def report(self, node: yaml.Node, severity: Severity, message: str) -> None:
        mark = node.start_mark
        self.findings.append(Finding(mark.line + 1, mark.column + 1, severity, message))

    def entries(self, node: yaml.MappingNode, path: str) -> Entries:
        """The mapping's entries by normalised key, reporting bad and duplicate keys."""
        # Resolve "<<: *anchor" merges the way PyYAML's constructor would.
        try:
            self.loader.flatten_mapping(node)
        except yaml.constructor.ConstructorError as err:
            mark = err.problem_mark or node.start_mark
            self.findings.append(
                Finding(mark.line + 1, mark.column + 1, "error", f"{path or 'top level'}: {err.problem}")
            )
            return {}
        found: Entries = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                self.report(key, "error", f"{path or 'top level'}: keys must be strings")
                continue
            name = normalize_key(key.value)
            if name in found:
                earlier = found[name][0]
                # Say so when only the spelling differs: public-ip and public_ip collide.
                spelling = f' as "{earlier.value}"' if earlier.value != key.value else ""
                self.report(
                    key,
                    "warning",
                    f'duplicate key "{_join(path, key.value)}" (also on line '
                    f"{earlier.start_mark.line + 1}{spelling}); this one wins",
                )
            found[name] = (key, value)
        return found

    def check(self, node: yaml.Node, spec: Spec, path: str) -> None:
        if _is_null(node) or spec.kind == "any":
            # An empty value means "not set", which coreos-cloudinit accepts everywhere.
            return
        if spec.kind == "map":
            self.check_map(node, spec, path)
        elif spec.kind == "list":
            if not isinstance(node, yaml.SequenceNode):
                self.wrong_type(node, spec, path)
                return
            assert spec.item is not None
            for index, item in enumerate(node.value):
                self.check(item, spec.item, f"{path}[{index}]")
        else:
            self.check_scalar(node, spec, path)

    def check_map(self, node: yaml.Node, spec: Spec, path: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            self.wrong_type(node, spec, path)
            return
        entries = self.entries(node, path)
        for name, (key, value) in entries.items():
            sub = spec.fields.get(name)
            key_path = _join(path, key.value)
            if sub is None:
                self.report(
                    key,
                    "warning",
                    f'unknown key "{key_path}"{_misplaced_hint(spec, name)}',
                )
                continue
            if sub.deprecated:
                self.report(key, "warning", f'deprecated key "{key_path}": {sub.deprecated}')
            self.check(value, sub, key_path)
        for name in spec.required:
            if name not in entries or _is_null(entries[name][1]):
                self.report(node, "error", f'{path}: missing required key "{name}"')
        if spec is WRITE_FILE:
            self.check_encoded_content(entries, path)

    def check_scalar(self, node: yaml.Node, spec: Spec, path: str) -> None:
        if not isinstance(node, yaml.ScalarNode) or _scalar_name(node) not in _ACCEPTS[spec.kind]:
            self.wrong_type(node, spec, path)
            return
        if spec.check is not None:
            problem = spec.check(node.value)
            if problem is not None:
                severity, message = problem
                self.report(node, severity, f"{path}: {message}")

    def check_encoded_content(self, entries: Entries, path: str) -> None:
        encoding = entries.get("encoding")
        content = entries.get("content")
        if encoding is None or content is None or _is_null(content[1]):
            return
        encoding_text, content_node = encoding[1].value, content[1]
        if not isinstance(content_node, yaml.ScalarNode) or encoding_text not in ENCODINGS:
            return  # a wrong type or unknown encoding has been reported already
        try:
            decode_content(content_node.value, encoding_text)
        except ValueError as err:
            self.report(
                content_node,
                "error",
                f'{path}.content: cannot be decoded as "{encoding_text}": {err}',
            )

    def wrong_type(self, node: yaml.Node, spec: Spec, path: str) -> None:
        self.report(
            node,
            "error",
            f"{path}: expected {_KIND_NAMES[spec.kind]}, got {_node_name(node)}",
        )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null"


def _scalar_name(node: yaml.ScalarNode) -> str:
    return _SCALAR_NAMES.get(node.tag, node.tag)


def _node_name(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return _scalar_name(node)


def _misplaced_hint(spec: Spec, name: str) -> str:
    # Putting write_files under coreos:, or units at the top level, is a common slip.
    if spec is COREOS and name in ROOT.fields:
        return f" ({name} belongs at the top level, not under coreos)"
    if spec is ROOT and name in COREOS.fields:
        return f" ({name} belongs under coreos:)"
    return ""

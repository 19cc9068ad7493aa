"""The parsed form of valid cloud-config user-data, with keys normalised to underscores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from fleetpy.cloudinit.schema import ROOT, Spec, decode_content, normalize_key
from fleetpy.cloudinit.validate import Finding, read


class CloudConfigError(ValueError):
    """User-data that validate() found errors in; `findings` holds all of its findings."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        lines = [f"{f.line}:{f.column}: {f.severity}: {f.message}" for f in findings]
        super().__init__("invalid cloud-config:\n" + "\n".join(lines))


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: str = ""
    # The mode as a number; cloud-config gives it as octal text ("0644").
    permissions: int | None = None
    owner: str | None = None
    encoding: str | None = None

    def decoded(self) -> bytes:
        """The bytes to write, after undoing `encoding`."""
        return decode_content(self.content, self.encoding)


@dataclass(frozen=True)
class DropIn:
    name: str
    content: str = ""


@dataclass(frozen=True)
class Unit:
    name: str
    content: str | None = None
    command: str | None = None
    enable: bool = False
    runtime: bool = False
    mask: bool = False
    drop_ins: list[DropIn] = field(default_factory=list)


@dataclass(frozen=True)
class CloudConfig:
    hostname: str | None = None
    ssh_authorized_keys: list[str] = field(default_factory=list)
    write_files: list[WriteFile] = field(default_factory=list)
    # Each user as a dict of its (normalised) keys; "name" is always present.
    users: list[dict[str, Any]] = field(default_factory=list)
    etcd2: dict[str, Any] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    update: dict[str, Any] = field(default_factory=dict)
    locksmith: dict[str, Any] = field(default_factory=dict)
    flannel: dict[str, Any] = field(default_factory=dict)


def load(text: str) -> CloudConfig:
    """Parse cloud-config `text`; raises CloudConfigError if validate() reports an error.

    Warnings (unknown or deprecated keys) do not stop loading; unknown keys are dropped.
    """
    findings, loader, root = read(text)
    if any(f.severity == "error" for f in findings):
        raise CloudConfigError(findings)
    # Built from the nodes validate() read: the text is parsed once.
    data = _to_python(loader, root, ROOT) if loader is not None and root is not None else None
    data = data or {}
    coreos = data.get("coreos") or {}
    return CloudConfig(
        hostname=data.get("hostname"),
        ssh_authorized_keys=data.get("ssh_authorized_keys") or [],
        write_files=[_write_file(f) for f in data.get("write_files") or []],
        users=data.get("users") or [],
        etcd2=coreos.get("etcd2") or {},
        fleet=coreos.get("fleet") or {},
        units=[_unit(u) for u in coreos.get("units") or []],
        update=coreos.get("update") or {},
        locksmith=coreos.get("locksmith") or {},
        flannel=coreos.get("flannel") or {},
    )


def _to_python(loader: yaml.SafeLoader, node: yaml.Node, spec: Spec) -> Any:
    """Build the value of a validated node, typed by the schema rather than by YAML."""
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return None
    if spec.kind == "any":
        return loader.construct_object(node, deep=True)
    if spec.kind == "str":
        # The text as written: YAML 1.1 would turn "off" into False and 0644 into 420.
        return node.value
    if spec.kind == "list":
        assert spec.item is not None
        return [_to_python(loader, item, spec.item) for item in node.value]
    if spec.kind == "map":
        loader.flatten_mapping(node)
        result: dict[str, Any] = {}
        for key, value in node.value:
            name = normalize_key(key.value)
            if name in spec.fields:
                result[name] = _to_python(loader, value, spec.fields[name])
        return result
    return loader.construct_object(node, deep=True)


def _write_file(raw: dict[str, Any]) -> WriteFile:
    permissions = raw.get("permissions")
    return WriteFile(
        path=raw["path"],
        content=raw.get("content") or "",
        permissions=int(permissions, 8) if permissions else None,
        owner=raw.get("owner"),
        encoding=raw.get("encoding"),
    )


def _unit(raw: dict[str, Any]) -> Unit:
    return Unit(
        name=raw["name"],
        content=raw.get("content"),
        command=raw.get("command"),
        enable=bool(raw.get("enable")),
        runtime=bool(raw.get("runtime")),
        mask=bool(raw.get("mask")),
        drop_ins=[DropIn(d["name"], d.get("content") or "") for d in raw.get("drop_ins") or []],
    )

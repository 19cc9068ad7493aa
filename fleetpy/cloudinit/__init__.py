"""Cloud-config user-data: validate it and apply its coreos: section."""

from fleetpy.cloudinit.model import (
    CloudConfig,
    CloudConfigError,
    DropIn,
    Unit,
    WriteFile,
    load,
)
from fleetpy.cloudinit.substitute import substitute
from fleetpy.cloudinit.validate import Finding, validate

__all__ = [
    "CloudConfig",
    "CloudConfigError",
    "DropIn",
    "Finding",
    "Unit",
    "WriteFile",
    "load",
    "substitute",
    "validate",
]

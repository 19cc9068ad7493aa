"""Errors raised when a unit name, unit file or [X-Fleet] section is unusable."""


class UnitError(ValueError):
    """Base class; the message tells a person what was wrong and how to fix it."""


class InvalidUnitName(UnitError):
    """A unit name that systemd or fleet would refuse."""


class InvalidUnitFile(UnitError):
    """Unit file text or API options that do not form a valid unit file."""


class InvalidFleetOptions(UnitError):
    """An [X-Fleet] section whose scheduling options are wrong or contradictory."""

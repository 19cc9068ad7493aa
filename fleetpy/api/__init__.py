"""fleetd's HTTP/JSON API (fleet's /fleet/v1 plus /fleetpy/v1 extensions) and its server."""

from fleetpy.api.app import create_app
from fleetpy.api.local import LocalUnitInfo, SystemctlUnitInfo
from fleetpy.api.serving import serve

__all__ = ["LocalUnitInfo", "SystemctlUnitInfo", "create_app", "serve"]

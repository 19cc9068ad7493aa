"""Replace the $private_ipv4 / $public_ipv4 variables that cloud-config text may contain."""

from __future__ import annotations

import re

# A preceding backslash escapes a variable, as in coreos-cloudinit: "\$public_ipv4"
# becomes the literal "$public_ipv4" instead of an address.
_VARIABLE = re.compile(r"(\\?)\$(private_ipv4|public_ipv4)")


def substitute(text: str, private_ipv4: str | None, public_ipv4: str | None) -> str:
    """Return `text` with $private_ipv4 and $public_ipv4 replaced by the given addresses.

    A variable whose address is None is left as it is, because the platform did not
    provide one and an empty string would silently produce broken URLs.
    """
    values = {"private_ipv4": private_ipv4, "public_ipv4": public_ipv4}

    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        value = values[name]
        if value is None:
            return match.group(0)
        if escaped:
            return "$" + name
        return value

    return _VARIABLE.sub(replace, text)

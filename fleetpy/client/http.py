"""A synchronous client of fleetd's API over its unix socket or TCP (httpx)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Any, Self
from urllib.parse import quote

import httpx


class APIError(Exception):
    """fleetd answered with an error; `message` is its explanation."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectionFailed(APIError):
    """fleetd could not be reached at all."""


class NoAnswer(APIError):
    """fleetd took the request but did not answer within the request timeout."""


class EtcdUnreachable(APIError):
    """fleetd answered, but etcd did not: fleetd runs, the cluster's store is away."""


# The API's error reason for an etcd that did not answer (fleetpy.api.errors.ETCD_UNREACHABLE).
_ETCD_UNREACHABLE = "etcdUnreachable"


class Client:
    """fleet's API client; `endpoint` is unix:///path/fleet.sock or http(s)://host:port."""

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        timeout: float = 10,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ):
        """`ca_file` verifies an https fleetd (the cluster CA); `cert_file`/`key_file` are this
        client's certificate for a fleetd that admits clients by certificate (mTLS)."""
        self.endpoint = endpoint
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs both --cert-file and --key-file")
        if endpoint.startswith("unix://"):
            path = endpoint.removeprefix("unix://")
            if not path:
                raise ValueError(f"bad endpoint {endpoint!r}; expected unix:///path/to/fleet.sock")
            self._socket_path: str | None = path
            transport = httpx.HTTPTransport(uds=path)
            base_url = "http://fleetd"
        elif endpoint.startswith(("http://", "https://")):
            self._socket_path = None
            transport = None
            base_url = endpoint.rstrip("/")
        else:
            raise ValueError(
                f"bad endpoint {endpoint!r}; expected unix:///path/fleet.sock or http(s)://HOST:PORT"
            )
        verify: ssl.SSLContext | bool = True
        if ca_file or cert_file:
            verify = ssl.create_default_context(cafile=ca_file or None)
            if cert_file and key_file:
                verify.load_cert_chain(cert_file, key_file)
        self._http = httpx.Client(
            base_url=base_url, transport=transport, headers=headers, timeout=timeout, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, error: Exception) -> ConnectionFailed:
        tls_trouble = "SSL" in str(error) or isinstance(error, httpx.RemoteProtocolError)
        if self.endpoint.startswith("https://") and tls_trouble:
            # fleetd runs (it took the connection) but the TLS handshake or its checks failed.
            return ConnectionFailed(
                0,
                f"cannot reach fleetd at {self.endpoint}: {error}; TLS failed: check --ca-file "
                "(the CA that signed fleetd's certificate) and, if fleetd admits clients by "
                "certificate, --cert-file and --key-file",
            )
        return ConnectionFailed(
            0,
            f"cannot reach fleetd at {self.endpoint}: {error}; is fleetd "
            "running? set --endpoint or FLEETCTL_ENDPOINT",
        )

    def _check_socket(self) -> None:
        # Said plainly up front; httpcore would also leak the socket of a failed unix connect.
        if self._socket_path is not None and not os.path.exists(self._socket_path):
            raise self._unreachable(FileNotFoundError(f"no socket at {self._socket_path}"))

    def _no_answer(self, error: Exception) -> NoAnswer:
        return NoAnswer(
            0,
            f"fleetd at {self.endpoint} took the request but did not answer within "
            f"{self._http.timeout.read:g}s ({type(error).__name__}); it may be overloaded, "
            "or give it more time with --request-timeout",
        )

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        self._check_socket()
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as error:
            raise self._no_answer(error) from None
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        _raise_for_error(response)
        return response

    def _paged(self, path: str, key: str, params: dict[str, str] | None = None) -> list[dict]:
        items: list[dict] = []
        params = dict(params or {})
        while True:
            body = self._request("GET", path, params=params).json()
            items.extend(body.get(key) or [])
            token = body.get("nextPageToken")
            if not token:
                return items
            params["nextPageToken"] = token

    # Units
    def units(self) -> list[dict]:
        return self._paged("/fleet/v1/units", "units")

    def unit(self, name: str) -> dict | None:
        try:
            return self._request("GET", _unit_path(name)).json()
        except APIError as error:
            if error.code == 404:
                return None
            raise

    def create_unit(self, name: str, desired_state: str, options: list[dict] | None = None) -> None:
        """Create a unit; fleetd gives an instance sent without options its template's."""
        body: dict[str, Any] = {"desiredState": desired_state}
        if options:
            body["options"] = options
        self._request("PUT", _unit_path(name), json=body)

    def set_unit_target_state(self, name: str, state: str) -> None:
        self._request("PUT", _unit_path(name), json={"desiredState": state})

    def destroy_unit(self, name: str) -> None:
        self._request("DELETE", _unit_path(name))

    def unit_states(self, machine_id: str | None = None, unit_name: str | None = None) -> list[dict]:
        params = {k: v for k, v in (("machineID", machine_id), ("unitName", unit_name)) if v}
        return self._paged("/fleet/v1/state", "states", params)

    # Machines
    def machines(self) -> list[dict]:
        return self._paged("/fleet/v1/machines", "machines")

    def set_machine_metadata(self, machine_id: str, key: str, value: str | None) -> None:
        """Set a metadata key, or remove it when `value` is None."""
        path = f"/{machine_id}/metadata/{key}"
        op = {"op": "remove", "path": path} if value is None else {"op": "add", "path": path, "value": value}
        self._request("PATCH", "/fleet/v1/machines", json=[op])

    # fleetpy extensions
    def pending_reason(self, name: str) -> str | None:
        return self._request("GET", f"/fleetpy/v1/units/{_quoted(name)}/pending").json()["reason"]

    def explain(self, name: str) -> list[str]:
        return self._request("GET", f"/fleetpy/v1/units/{_quoted(name)}/explain").json()["lines"]

    def unit_status(self, name: str) -> str:
        return self._request("GET", f"/fleetpy/v1/units/{_quoted(name)}/status").json()["status"]

    def unit_journal(self, name: str, lines: int = 10, follow: bool = False) -> Iterator[str]:
        params = {"lines": str(lines), "follow": "true" if follow else "false"}
        path = f"/fleetpy/v1/units/{_quoted(name)}/journal"
        # A followed journal has no end; only connecting may time out.
        timeout = httpx.Timeout(self._http.timeout.connect, read=None) if follow else httpx.USE_CLIENT_DEFAULT
        self._check_socket()
        try:
            with self._http.stream("GET", path, params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_error(response)
                yield from response.iter_lines()
        except (httpx.ReadTimeout, httpx.WriteTimeout) as error:
            raise self._no_answer(error) from None
        except httpx.TransportError as error:
            raise self._unreachable(error) from None


def _quoted(name: str) -> str:
    return quote(name, safe="")


def _unit_path(name: str) -> str:
    return f"/fleet/v1/units/{_quoted(name)}"


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    reason = None
    try:
        error = response.json()["error"]
        message, reason = error["message"], error.get("reason")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = response.text.strip() or response.reason_phrase
    if reason == _ETCD_UNREACHABLE:
        raise EtcdUnreachable(response.status_code, f"fleetd answered, but {message}")
    raise APIError(response.status_code, message)

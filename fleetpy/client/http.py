"""A synchronous client of fleetd's API over its unix socket or TCP, on the standard library.

http.client rather than httpx: fleetctl is a short process, and importing httpx took 0.10 s
of the 0.28 s `fleetctl list-machines` took (http.client: 0.005 s); the client needs only
HTTP/1.1 requests with JSON bodies on one keep-alive connection, which http.client does.
Several requests can be sent back to back on that connection before any answer is read
(`Client.pipeline`), so a command about many units waits one round trip, not one per request.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self
from urllib.parse import quote, urlencode, urlsplit

# (method, path, query parameters, JSON body)
_Request = tuple[str, str, dict | list | None, Any]
# A command about many units spreads its requests over up to LANES connections, at least
# PER_LANE requests each (fewer are not worth another connection).
LANES = 8
PER_LANE = 4


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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("fleetd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _Response:
    """Status, reason and body of one answer."""

    def __init__(self, status: int, reason: str, body: bytes):
        self.status_code = status
        self.reason_phrase = reason
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _SharedReader:
    """One buffered reader for every pipelined response; a response closing it changes nothing."""

    def __init__(self, sock: socket.socket):
        self._file = sock.makefile("rb")

    def makefile(self, mode: str, *args: Any) -> _SharedReader:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def close(self) -> None:
        pass


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
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs both --cert-file and --key-file")
        self._socket_path: str | None = None
        self._base = ""
        self._host = "fleetd"
        if endpoint.startswith("unix://"):
            path = endpoint.removeprefix("unix://")
            if not path:
                raise ValueError(f"bad endpoint {endpoint!r}; expected unix:///path/to/fleet.sock")
            self._socket_path = path
            self._connect: Callable[[], http.client.HTTPConnection] = lambda: _UnixConnection(path, timeout)
        elif endpoint.startswith(("http://", "https://")):
            url = urlsplit(endpoint.rstrip("/"))
            if not url.hostname:
                raise ValueError(f"bad endpoint {endpoint!r}; expected http(s)://HOST:PORT")
            self._base, self._host = url.path, url.netloc
            if url.scheme == "https":
                import ssl  # only for https: it costs a unix-socket fleetctl 10 ms

                context = ssl.create_default_context(cafile=ca_file or None)
                if cert_file and key_file:
                    context.load_cert_chain(cert_file, key_file)
                self._connect = lambda: http.client.HTTPSConnection(
                    url.hostname, url.port, timeout=timeout, context=context
                )
            else:
                self._connect = lambda: http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        else:
            raise ValueError(
                f"bad endpoint {endpoint!r}; expected unix:///path/fleet.sock or http(s)://HOST:PORT"
            )
        self._connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, error: Exception) -> ConnectionFailed:
        tls_trouble = "SSL" in str(error) or isinstance(
            error, http.client.HTTPException | ConnectionResetError
        )
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
        if self._socket_path is not None and not os.path.exists(self._socket_path):
            raise self._unreachable(FileNotFoundError(f"no socket at {self._socket_path}"))

    def _no_answer(self, error: Exception) -> NoAnswer:
        return NoAnswer(
            0,
            f"fleetd at {self.endpoint} took the request but did not answer within "
            f"{self.timeout:g}s ({type(error).__name__}); it may be overloaded, "
            "or give it more time with --request-timeout",
        )

    def _open(self) -> http.client.HTTPConnection:
        """The keep-alive connection, connected."""
        self._check_socket()
        if self._connection is None or self._connection.sock is None:
            self.close()
            connection = self._connect()
            try:
                connection.connect()
            except OSError as error:
                connection.close()
                raise self._unreachable(error) from None
            self._connection = connection
        return self._connection

    def _message(
        self, method: str, path: str, params: dict | list | None, body: Any
    ) -> tuple[str, bytes | None, dict]:
        target = self._base + path + (f"?{urlencode(params)}" if params else "")
        headers = {**self._headers, "Host": self._host}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return target, data, headers

    def _request(
        self, method: str, path: str, params: dict | list | None = None, json: Any = None
    ) -> _Response:
        (response,) = self.pipeline([(method, path, params, json)])
        _raise_for_error(response)
        return response

    def pipeline(self, requests: Iterable[_Request]) -> list[_Response]:
        """Send every (method, path, params, json body) back to back on the one connection,
        then read the answers in order (HTTP/1.1 pipelining); errors are left to the caller."""
        requests = list(requests)
        reused = self._connection is not None
        try:
            return self._pipeline(requests)
        except TimeoutError as error:
            self.close()
            raise self._no_answer(error) from None
        except (OSError, http.client.HTTPException) as error:
            self.close()
            if not reused:
                raise self._unreachable(error) from None
        # fleetd closed the keep-alive connection while it was idle: one try on a fresh one.
        try:
            return self._pipeline(requests)
        except TimeoutError as error:
            self.close()
            raise self._no_answer(error) from None
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise self._unreachable(error) from None

    def _pipeline(self, requests: list[_Request]) -> list[_Response]:
        lanes = min(LANES, len(requests) // PER_LANE)
        if lanes > 1:
            return self._pipeline_in_lanes(requests, lanes)
        connection = self._open()
        assert connection.sock is not None
        connection.sock.sendall(self._payload(requests))
        responses, closing = _read_answers(connection.sock, requests)
        if closing:
            self.close()
        return responses

    def _pipeline_in_lanes(self, requests: list[_Request], count: int) -> list[_Response]:
        """Spread the requests over `count` connections, the requests about one path on one
        connection in their order: fleetd answers a connection's requests one after another,
        each waiting on etcd, but works on several connections at once."""
        lanes = _lanes(requests, count)
        connections = [self._open()]
        senders = []
        try:
            for _ in range(count - 1):
                connections.append(self._connect())
                connections[-1].connect()
            # Each lane sends while its answers are read, so a big batch cannot fill both ways.
            for connection, lane in zip(connections, lanes, strict=True):
                senders.append(_Sender(connection, self._payload([requests[i] for i in lane])))
            responses: list[_Response] = [None] * len(requests)  # type: ignore[list-item]
            closing = []
            for connection, lane in zip(connections, lanes, strict=True):
                assert connection.sock is not None
                answers, closes = _read_answers(connection.sock, [requests[i] for i in lane])
                closing.append(closes)
                for i, answer in zip(lane, answers, strict=True):
                    responses[i] = answer
            for sender in senders:
                sender.done()
        except BaseException:
            self.close()
            raise
        finally:
            for extra in connections[1:]:
                extra.close()
        if closing[0]:
            self.close()
        return responses

    def _payload(self, requests: list[_Request]) -> bytes:
        payload = bytearray()
        for method, path, params, body in requests:
            target, data, headers = self._message(method, path, params, body)
            head = [f"{method} {target} HTTP/1.1"]
            head += [f"{k}: {v}" for k, v in headers.items()]
            head.append(f"Content-Length: {len(data) if data is not None else 0}")
            payload += ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
            if data is not None:
                payload += data
        return bytes(payload)

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
        return self.many_units([name])[name]

    def many_units(self, names: Iterable[str]) -> dict[str, dict | None]:
        """Each unit (None when it does not exist), fetched in one pipelined round trip."""
        names = list(dict.fromkeys(names))
        answers = self.pipeline(("GET", _unit_path(name), None, None) for name in names)
        found: dict[str, dict | None] = {}
        for name, response in zip(names, answers, strict=True):
            if response.status_code == 404:
                found[name] = None
                continue
            _raise_for_error(response)
            found[name] = response.json()
        return found

    def create_unit(self, name: str, desired_state: str, options: list[dict] | None = None) -> None:
        """Create a unit; fleetd gives an instance sent without options its template's."""
        body: dict[str, Any] = {"desiredState": desired_state}
        if options:
            body["options"] = options
        self._request("PUT", _unit_path(name), json=body)

    def set_unit_target_state(self, name: str, state: str) -> None:
        self.set_target_states([name], state)

    def set_target_states(self, names: Iterable[str], state: str) -> None:
        """Set every unit's desired state, in one pipelined round trip."""
        for response in self.pipeline(("PUT", _unit_path(n), None, {"desiredState": state}) for n in names):
            _raise_for_error(response)

    def wait_units(self, names: Iterable[str], state: str, timeout: float) -> dict:
        """Wait up to `timeout` s (fleetd may cut it shorter) until the units reach `state`:
        {"units": [...], "failed": {name: reason}, "missing": [...], "done": bool}."""
        params = [("unit", name) for name in names] + [("state", state), ("timeout", f"{timeout:.3f}")]
        return self._request("GET", "/fleetpy/v1/wait", params=params).json()

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
    def set_cordon(self, machine_id: str, cordoned: bool) -> None:
        """Drain a machine (True) or let it take units again (False)."""
        self._request("PUT" if cordoned else "DELETE", f"/fleetpy/v1/machines/{_quoted(machine_id)}/cordon")

    def volumes(self) -> list[dict]:
        """Every volume: {"name", "driver", "machineID" (None if shared), "move", "units" (the
        submitted units naming it)}."""
        return self._request("GET", "/fleetpy/v1/volumes").json()["volumes"]

    def volume(self, name: str) -> dict:
        """One volume: {"name", "machineID", "move"}, its last move or None."""
        return self._request("GET", f"/fleetpy/v1/volumes/{_quoted(name)}").json()

    def move_volume(self, name: str, machine_id: str) -> dict:
        """Start moving a volume to a machine: the volume, with "started" False when it lives there."""
        return self._request(
            "POST", f"/fleetpy/v1/volumes/{_quoted(name)}/move", json={"machineID": machine_id}
        ).json()

    def forget_volume(self, name: str) -> None:
        self._request("DELETE", f"/fleetpy/v1/volumes/{_quoted(name)}")

    def pending_reason(self, name: str) -> str | None:
        return self._request("GET", f"/fleetpy/v1/units/{_quoted(name)}/pending").json()["reason"]

    def plan(self, name: str, options: list[dict] | None = None) -> list[str]:
        """Where `name` would go if started now (with `options`, or its submitted file)."""
        body = {} if options is None else {"options": options}
        return self._request("POST", f"/fleetpy/v1/units/{_quoted(name)}/plan", json=body).json()["lines"]

    def explain(self, name: str) -> list[str]:
        return self._request("GET", f"/fleetpy/v1/units/{_quoted(name)}/explain").json()["lines"]

    def unit_status(self, name: str) -> str:
        return self._request("GET", f"/fleetpy/v1/units/{_quoted(name)}/status").json()["status"]

    def events(self, unit: str | None = None, machine_id: str | None = None, limit: int = 100) -> list[dict]:
        params = {"limit": str(limit), **{k: v for k, v in (("unit", unit), ("machineID", machine_id)) if v}}
        return self._request("GET", "/fleetpy/v1/events", params).json()["events"]

    def follow_events(
        self, unit: str | None = None, machine_id: str | None = None, limit: int = 100
    ) -> Iterator[dict]:
        """Recent events, then each new one as it is recorded; never ends on its own."""
        params = {"limit": str(limit), "follow": "true"}
        params.update({k: v for k, v in (("unit", unit), ("machineID", machine_id)) if v})
        for line in self._stream("/fleetpy/v1/events", params, endless=True):
            if line.strip():
                yield json.loads(line)

    def unit_journal(self, name: str, lines: int = 10, follow: bool = False) -> Iterator[str]:
        params = {"lines": str(lines), "follow": "true" if follow else "false"}
        yield from self._stream(f"/fleetpy/v1/units/{_quoted(name)}/journal", params, endless=follow)

    def _stream(self, path: str, params: dict[str, str], endless: bool) -> Iterator[str]:
        """The response's lines as they come; an endless stream may be quiet for long."""
        target, _, headers = self._message("GET", path, params, None)
        # Its own connection: an endless stream has no end, and only connecting may time out.
        self._check_socket()
        connection = self._connect()
        try:
            try:
                connection.request("GET", target, headers=headers)
                if endless and connection.sock is not None:
                    connection.sock.settimeout(None)
                response = connection.getresponse()
                if response.status >= 400:
                    _raise_for_error(_Response(response.status, response.reason, response.read()))
                for line in response:
                    yield line.decode("utf-8", "replace").rstrip("\r\n")
            except TimeoutError as error:
                raise self._no_answer(error) from None
            except (OSError, http.client.HTTPException) as error:
                raise self._unreachable(error) from None
        finally:
            connection.close()


def _quoted(name: str) -> str:
    return quote(name, safe="")


def _unit_path(name: str) -> str:
    return f"/fleet/v1/units/{_quoted(name)}"


def _lanes(requests: list[_Request], count: int) -> list[list[int]]:
    """The requests' places, dealt into `count` lanes by path in turn; one path, one lane."""
    lanes: list[list[int]] = [[] for _ in range(count)]
    lane_of: dict[str, int] = {}
    for i, (_, path, _, _) in enumerate(requests):
        lanes[lane_of.setdefault(path, len(lane_of) % count)].append(i)
    return lanes


class _Sender:
    """Sends one lane's requests from a thread of its own."""

    def __init__(self, connection: http.client.HTTPConnection, payload: bytes):
        import threading  # only for a command about many units

        assert connection.sock is not None
        self._sock = connection.sock
        self._failure: OSError | None = None
        self._thread = threading.Thread(target=self._send, args=(payload,), daemon=True)
        self._thread.start()

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendall(payload)
        except OSError as error:  # raised by done(), in the caller's thread
            self._failure = error

    def done(self) -> None:
        self._thread.join()
        if self._failure is not None:
            raise self._failure


def _read_answers(sock: socket.socket, requests: list[_Request]) -> tuple[list[_Response], bool]:
    """The answers to `requests`, pipelined on `sock`; and whether fleetd closes the connection."""
    reader = _SharedReader(sock)
    responses = []
    closing = False
    for method, *_ in requests:
        answer = http.client.HTTPResponse(reader, method=method)  # type: ignore[arg-type]
        answer.begin()
        responses.append(_Response(answer.status, answer.reason, answer.read()))
        closing = closing or answer.will_close
    return responses, closing


def _raise_for_error(response: _Response) -> None:
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

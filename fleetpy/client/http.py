"""A synchronous client of fleetd's API over its unix socket or TCP, on the standard library.

HTTP/1.1 is spoken here on a plain socket rather than through httpx or http.client: fleetctl is a
short process, and importing httpx took 0.10 s of the 0.28 s `fleetctl list-machines` took;
http.client then cost 15 ms of a 62 ms start (it imports the email package and ssl), the
reading below none. The client needs only requests with JSON bodies and answers with a
Content-Length or chunked body, on keep-alive connections. Several requests are sent back to
back before any answer is read (`Client.pipeline`), so a command about many units waits one
round trip, not one per request.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Self
from urllib.parse import quote, urlencode, urlsplit

# (method, path, query parameters, JSON body)
_Request = tuple[str, str, dict | list | None, Any]
# A command about many units spreads its requests over up to LANES connections, at least
# PER_LANE requests each (fewer are not worth another connection).
LANES = 16
PER_LANE = 4
# Pauses before trying again the requests of connections fleetd did not take.
AGAIN_PAUSES = (0.05, 0.2, 0.5)


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


class BadAnswer(ConnectionError):
    """What came back is not an HTTP/1.1 answer, or it ended early."""


class _Connection:
    """One keep-alive connection: its socket, and one buffered reader of everything it answers."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


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
            self._connect: Callable[[], _Connection] = lambda: _unix_connection(path, timeout)
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
                self._connect = lambda: _tcp_connection(url.hostname, url.port or 443, timeout, context)
            else:
                self._connect = lambda: _tcp_connection(url.hostname, url.port or 80, timeout)
        else:
            raise ValueError(
                f"bad endpoint {endpoint!r}; expected unix:///path/fleet.sock or http(s)://HOST:PORT"
            )
        self._connection: _Connection | None = None

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unreachable(self, error: Exception) -> ConnectionFailed:
        tls_trouble = "SSL" in str(error) or isinstance(error, BadAnswer | ConnectionResetError)
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

    def _open(self) -> _Connection:
        """The keep-alive connection, connected."""
        self._check_socket()
        if self._connection is None:
            try:
                self._connection = self._connect()
            except OSError as error:
                raise self._unreachable(error) from None
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
        """Send every (method, path, params, json body) back to back on the keep-alive
        connection (HTTP/1.1 pipelining; many go over several, see _pipeline_in_lanes), and
        return the answers in the requests' order; errors are left to the caller."""
        requests = list(requests)
        reused = self._connection is not None
        try:
            return self._pipeline(requests)
        except TimeoutError as error:
            self.close()
            raise self._no_answer(error) from None
        except OSError as error:
            self.close()
            if not reused:
                raise self._unreachable(error) from None
        # fleetd closed the keep-alive connection while it was idle: one try on a fresh one.
        try:
            return self._pipeline(requests)
        except TimeoutError as error:
            self.close()
            raise self._no_answer(error) from None
        except OSError as error:
            self.close()
            raise self._unreachable(error) from None

    def _pipeline(self, requests: list[_Request]) -> list[_Response]:
        lanes = min(LANES, len(requests) // PER_LANE)
        if lanes > 1:
            return self._pipeline_in_lanes(requests, lanes)
        return self._pipeline_on_one(requests)

    def _pipeline_on_one(self, requests: list[_Request]) -> list[_Response]:
        connection = self._open()
        connection.sock.sendall(self._payload(requests))
        responses: list[_Response] = []
        if _read_answers(connection, requests, responses):
            self.close()
        return responses

    def _pipeline_in_lanes(self, requests: list[_Request], count: int) -> list[_Response]:
        """Spread the requests over up to `count` connections, the requests about one path on
        one connection in their order: fleetd answers a connection's requests one after another,
        each waiting on etcd, but works on several connections at once. A connection fleetd
        did not take (it is at its connection limit) answers nothing: its requests go again on
        one connection, after the others (all the requests sent in lanes are idempotent: reads,
        creates and desired states)."""
        connections = self._connections(count)
        responses: list[_Response] = [None] * len(requests)  # type: ignore[list-item]
        refused: list[int] = []
        main_closes = False
        try:
            lanes = _lanes(requests, len(connections))
            # Each lane sends while its answers are read, so a big batch cannot fill both ways.
            senders = [
                _Sender(connection, self._payload([requests[i] for i in lane]))
                for connection, lane in zip(connections, lanes, strict=True)
            ]
            for k, (connection, lane, sender) in enumerate(zip(connections, lanes, senders, strict=True)):
                answers, closing = _read_lane(connection, [requests[i] for i in lane], sender)
                main_closes = main_closes or (k == 0 and closing)
                if answers is None:
                    refused += lane
                    continue
                for i, answer in zip(lane, answers, strict=True):
                    responses[i] = answer
        except BaseException:
            self.close()
            raise
        finally:
            for extra in connections[1:]:
                extra.close()
        if main_closes:
            self.close()
        if refused:
            refused.sort()
            for i, answer in zip(refused, self._again([requests[i] for i in refused]), strict=True):
                responses[i] = answer
        return responses

    def _again(self, requests: list[_Request]) -> list[_Response]:
        """Requests a connection fleetd did not take, on one connection; fleetd may still be at
        its limit while other clients' connections close, so a few tries, a moment apart."""
        for pause in AGAIN_PAUSES:
            try:
                return self._pipeline_on_one(requests)
            except TimeoutError:
                raise  # fleetd took them and is slow: not a refusal
            except OSError:
                self.close()
                time.sleep(pause)
        return self._pipeline_on_one(requests)

    def _connections(self, count: int) -> list[_Connection]:
        """The keep-alive connection, and up to `count` - 1 more as fleetd takes them."""
        connections = [self._open()]
        for _ in range(count - 1):
            try:
                connections.append(self._connect())
            except OSError:
                break  # fewer lanes
        return connections

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
        self.create_units([(name, desired_state, options)])

    def create_units(self, units: Iterable[tuple[str, str, list[dict] | None]]) -> None:
        """Create each (name, desired state, options), in one pipelined round trip."""
        requests = []
        for name, desired_state, options in units:
            body: dict[str, Any] = {"desiredState": desired_state}
            if options:
                body["options"] = options
            requests.append(("PUT", _unit_path(name), None, body))
        if requests:
            for response in self.pipeline(requests):
                _raise_for_error(response)

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
        # Its own connection: an endless stream has no end, and only connecting may time out.
        self._check_socket()
        try:
            connection = self._connect()
        except OSError as error:
            raise self._unreachable(error) from None
        try:
            try:
                connection.sock.sendall(self._payload([("GET", path, params, None)]))
                if endless:
                    connection.sock.settimeout(None)
                status, reason, headers, _ = _read_head(connection.reader)
                parts = _body_parts(connection.reader, "GET", status, headers)
                if status >= 400:
                    _raise_for_error(_Response(status, reason, b"".join(parts)))
                yield from _lines(parts)
            except TimeoutError as error:
                raise self._no_answer(error) from None
            except OSError as error:
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

    def __init__(self, connection: _Connection, payload: bytes):
        import threading  # only for a command about many units

        self._sock = connection.sock
        self._failure: OSError | None = None
        self._thread = threading.Thread(target=self._send, args=(payload,), daemon=True)
        self._thread.start()

    def _send(self, payload: bytes) -> None:
        try:
            self._sock.sendall(payload)
        except OSError as error:  # told by join(), in the caller's thread
            self._failure = error

    def join(self) -> OSError | None:
        """Wait until all is sent; what went wrong, if anything."""
        self._thread.join()
        return self._failure


def _unix_connection(path: str, timeout: float) -> _Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return _Connection(sock)


def _tcp_connection(host: str, port: int, timeout: float, tls: Any = None) -> _Connection:
    """Connected to host:port; with `tls` (an ssl.SSLContext), over TLS checked against host."""
    sock = socket.create_connection((host, port), timeout)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    return _Connection(sock)


def _read_lane(
    connection: _Connection, requests: list[_Request], sender: _Sender
) -> tuple[list[_Response] | None, bool]:
    """One lane's answers, and whether fleetd closes its connection after them; None when
    fleetd closed the connection before answering any: it was at its connection limit."""
    answers: list[_Response] = []
    try:
        closing = _read_answers(connection, requests, answers)
    except OSError:
        if answers:
            raise
        sender.join()  # it failed too, or sent into a connection nobody reads
        return None, True
    if (failure := sender.join()) is not None:
        raise failure
    return answers, closing


def _read_answers(connection: _Connection, requests: list[_Request], answers: list[_Response]) -> bool:
    """Read the answers to `requests`, pipelined on `connection`, into `answers` as they come
    (on an error, those read so far are there); whether fleetd closes the connection."""
    closing = False
    for method, *_ in requests:
        status, reason, headers, closes = _read_head(connection.reader)
        body = b"".join(_body_parts(connection.reader, method, status, headers))
        answers.append(_Response(status, reason, body))
        closing = closing or closes or not _length_known(method, status, headers)
    return closing


# No line of an answer's head is longer from fleetd; a longer one is not an HTTP answer.
_LINE_MAX = 65536


def _readline(reader: Any, where: str) -> bytes:
    line = reader.readline(_LINE_MAX + 1)
    if not line:
        raise BadAnswer(f"fleetd closed the connection {where}")
    if len(line) > _LINE_MAX:
        raise BadAnswer(f"a line over {_LINE_MAX} bytes {where}")
    return line


def _read_head(reader: Any) -> tuple[int, str, dict[str, str], bool]:
    """An answer's status, reason and headers (names in lower case), and whether fleetd closes
    the connection after it."""
    line = _readline(reader, "before it answered")
    version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
    status, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not status.isdigit():
        raise BadAnswer(f"not an HTTP/1.1 answer: {line[:80]!r}")
    headers = {}
    while (line := _readline(reader, "in an answer's headers")) not in (b"\r\n", b"\n"):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    closing = version == "HTTP/1.0" or "close" in headers.get("connection", "").lower()
    return int(status), reason, headers, closing


def _length_known(method: str, status: int, headers: dict[str, str]) -> bool:
    """Whether the body's end is known before the connection closes."""
    return (
        method == "HEAD"
        or status in (204, 304)
        or "content-length" in headers
        or "chunked" in headers.get("transfer-encoding", "").lower()
    )


def _body_parts(reader: Any, method: str, status: int, headers: dict[str, str]) -> Iterator[bytes]:
    """An answer's body as it arrives: whole for a Content-Length, chunk by chunk if chunked,
    and until the connection closes otherwise."""
    if method == "HEAD" or status in (204, 304):
        return
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := _chunk_size(_readline(reader, "in a chunked body")):
            data = reader.read(size)
            if len(data) < size:
                raise BadAnswer("fleetd closed the connection in a chunk")
            _readline(reader, "after a chunk")
            yield data
        while _readline(reader, "in a chunked body's trailer") not in (b"\r\n", b"\n"):
            pass
    elif "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise BadAnswer(f"bad Content-Length {length!r}")
        data = reader.read(int(length))
        if len(data) < int(length):
            raise BadAnswer("fleetd closed the connection before the whole body came")
        yield data
    else:
        while data := reader.read1(65536):
            yield data


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise BadAnswer(f"bad chunk size line {line[:80]!r}") from None


def _lines(parts: Iterator[bytes]) -> Iterator[str]:
    """Text lines, without their line ends, out of a body that comes in parts."""
    rest = b""
    for part in parts:
        *lines, rest = (rest + part).split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if rest:
        yield rest.decode("utf-8", "replace").rstrip("\r")


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

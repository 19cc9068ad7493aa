"""A store that times every etcd request and counts the failed ones, for fleetd's /metrics."""

from __future__ import annotations

import time
from typing import Any

from fleetpy.conf import metrics
from fleetpy.registry.store import Store, StoreError

# Long polls last as long as the cluster is quiet: their time says nothing about etcd.
UNTIMED = frozenset({"wait", "changes", "last_failure", "outage", "close"})


class MeasuredStore:
    """Any Store, with `fleetpy_etcd_request_seconds{call,operation}` and `fleetpy_etcd_errors_total`.

    `operation` is the store's method; `call` the registry call it serves (metrics.REGISTRY_CALL).
    """

    def __init__(self, store: Store):
        self.inner = store

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in UNTIMED or name.startswith("_") or not callable(attribute):
            return attribute

        async def measured(*args: Any, **kwargs: Any) -> Any:
            call = metrics.REGISTRY_CALL.get() or metrics.OTHER_CALL
            started = time.perf_counter()
            try:
                return await attribute(*args, **kwargs)
            except StoreError:
                metrics.ETCD_ERRORS.inc(call, name)
                raise
            finally:
                metrics.ETCD_SECONDS.observe(time.perf_counter() - started, call, name)

        return measured

"""Group commit: submits that arrive while one is being written go out together.

fleetctl sends a command's PUTs over several connections at once, and fleetd answered each with
a transaction of its own, each waiting on etcd and on the busy event loop: 60 submits took
60 transactions. Here a lone submit is written at once, and those that arrive meanwhile wait and
go in the next transaction together, so a burst takes a few transactions and each submit's wait
is about one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from fleetpy.registry.store import AlreadyExists, Op

# Two ops each: one etcd transaction (etcd's default --max-txn-ops is 128).
MAX_GROUP = 64


@dataclass
class _Submit:
    name: str  # the key that makes two submits exclusive: they never share a transaction
    ops: list[Op]
    done: asyncio.Future = field(repr=False)


class SubmitGroups:
    """Writes each submit's ops through `apply`, which must write all of a group's ops or none
    (etcd v3's transaction, memory). When a create-only key of a group exists, its submits are
    written again one by one, so each gets its own answer."""

    def __init__(self, apply: Callable[[Sequence[Op]], Awaitable[int]]):
        self._apply = apply
        self._waiting: list[_Submit] = []
        self._writer: asyncio.Task | None = None

    async def submit(self, name: str, ops: list[Op]) -> None:
        loop = asyncio.get_running_loop()
        if self._writer is not None and not self._writer.done() and self._writer.get_loop() is not loop:
            await self._apply(ops)  # a registry used from two event loops (tests): not grouped
            return
        done = loop.create_future()
        self._waiting.append(_Submit(name, ops, done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write())
        await done

    async def _write(self) -> None:
        group: list[_Submit] = []
        try:
            while self._waiting:
                group = self._next_group()
                await self._write_group(group)
        finally:  # cancelled (fleetd stopping): nobody is left waiting for ever
            for submit in [*group, *self._waiting]:
                submit.done.cancel()  # no-op for those answered
            self._waiting.clear()

    def _next_group(self) -> list[_Submit]:
        group: list[_Submit] = []
        names: set[str] = set()
        later: list[_Submit] = []
        for submit in self._waiting:
            if submit.name in names or len(group) == MAX_GROUP:
                later.append(submit)
            else:
                group.append(submit)
                names.add(submit.name)
        self._waiting = later
        return group

    async def _write_group(self, group: list[_Submit]) -> None:
        # Content-addressed keys (unit files) can come twice with the same value: once is enough.
        ops = list({(op.key, type(op)): op for submit in group for op in submit.ops}.values())
        try:
            await self._apply(ops)
        except AlreadyExists as error:
            if len(group) == 1:
                _answer(group[0], error)
                return
            answers = await asyncio.gather(*(self._apply(s.ops) for s in group), return_exceptions=True)
            for submit, answer in zip(group, answers, strict=True):
                _answer(submit, answer if isinstance(answer, BaseException) else None)
        except Exception as error:  # noqa: BLE001 - every waiter hears how its write ended
            for submit in group:
                _answer(submit, error)
        else:
            for submit in group:
                _answer(submit, None)


def _answer(submit: _Submit, error: BaseException | None) -> None:
    if submit.done.done():
        return  # its caller stopped waiting
    if error is None:
        submit.done.set_result(None)
    else:
        submit.done.set_exception(error)

"""`fleetctl scale`'s pure step: which instances to run and which to destroy."""

from __future__ import annotations

from fleetpy.cli.fleetctl import scale_steps
from fleetpy.unit import UnitName

WEB = UnitName.parse("web@.service")


def test_scale_up_from_nothing_numbers_from_one() -> None:
    assert scale_steps(WEB, ["web@.service"], 3) == (["web@1.service", "web@2.service", "web@3.service"], [])


def test_scale_up_fills_gaps_first_and_keeps_what_runs() -> None:
    names = ["web@.service", "web@2.service", "web@5.service", "db.service"]
    assert scale_steps(WEB, names, 4) == (
        ["web@1.service", "web@2.service", "web@3.service", "web@5.service"],
        [],
    )


def test_scale_down_removes_the_highest_numbers_first() -> None:
    names = [f"web@{n}.service" for n in (1, 2, 3, 10, 4)]
    assert scale_steps(WEB, names, 2) == (
        ["web@1.service", "web@2.service"],
        ["web@10.service", "web@4.service", "web@3.service"],
    )
    assert scale_steps(WEB, names, 0) == ([], [f"web@{n}.service" for n in (10, 4, 3, 2, 1)])


def test_other_templates_and_named_instances_are_left_alone() -> None:
    names = ["web@blue.service", "web@01.service", "api@1.service", "web@1.socket", "web@1.service"]
    assert scale_steps(WEB, names, 1) == (["web@1.service"], [])

"""The goals a measured run is held to: ``{name: (label, comparison, bound)}`` tables.

GOALS = {"teacher_map": ("teacher mAP", ">=", 0.30), ...}
check_goals(GOALS, {"teacher_map": 0.31, ...})
-> {"teacher_map": {"value": 0.31, "goal": "≥ 0.3", "met": True}, ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Goal = tuple[str, str, float]  # label, "<=" or ">=", bound


def goal_met(goal: Goal, value: float) -> bool:
    """Whether ``value`` meets ``goal`` (bounds included; False for NaN)."""
    _, op, bound = goal
    return value <= bound if op == "<=" else value >= bound


def goal_text(goal: Goal) -> str:
    """The goal as the tables print it, e.g. ``"≤ 0.2"``."""
    _, op, bound = goal
    return f"{'≤' if op == '<=' else '≥'} {bound:g}"


def check_goals(table: Mapping[str, Goal], values: Mapping[str, float]) -> dict[str, Any]:
    """``{name: {"value", "goal", "met"}}`` for each measured value, in the values' order."""
    return {
        name: {"value": value, "goal": goal_text(table[name]), "met": goal_met(table[name], value)}
        for name, value in values.items()
    }

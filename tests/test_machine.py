"""What a results file records of the machine it ran on."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.experiments.machine import machine, threads_per_core


@pytest.mark.parametrize(
    ("siblings", "threads"), [("0\n", 1), ("0-1\n", 2), ("0,2\n", 2), ("0-1,4-5\n", 4)]
)
def test_threads_per_core_counts_the_siblings_of_the_first_cpu(
    tmp_path: Path, siblings: str, threads: int
) -> None:
    (tmp_path / "thread_siblings_list").write_text(siblings)
    assert threads_per_core(tmp_path) == threads


def test_threads_per_core_is_none_where_the_kernel_does_not_say(tmp_path: Path) -> None:
    assert threads_per_core(tmp_path) is None


def test_machine_records_the_threads_of_a_core() -> None:
    recorded = machine()
    assert recorded["threads_per_core"] == threads_per_core()
    assert recorded["threads_per_core"] is None or recorded["threads_per_core"] >= 1

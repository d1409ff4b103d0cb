"""What a results file records of the machine it ran on."""

from __future__ import annotations

from pathlib import Path

from distill.experiments.machine import machine, physical_cores


def topology(root: Path, siblings: dict[int, str]) -> Path:
    """A sysfs cpu tree: ``thread_siblings_list`` of each CPU."""
    for cpu, text in siblings.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "thread_siblings_list").write_text(text + "\n")
    return root


def test_physical_cores_count_smt_threads_of_one_core_once(tmp_path: Path) -> None:
    # 4 CPUs, two cores of two threads each (Intel's numbering: 0 and 2 share a core)
    root = topology(tmp_path, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"})
    assert physical_cores([0, 1, 2, 3], root) == 2
    assert physical_cores([0, 2], root) == 1  # a process pinned to one core's two threads
    assert physical_cores([0, 1], root) == 2
    # AMD's numbering, and no SMT at all
    assert physical_cores([0, 1], topology(tmp_path / "amd", {0: "0-1", 1: "0-1"})) == 1
    assert physical_cores([0, 1], topology(tmp_path / "plain", {0: "0", 1: "1"})) == 2


def test_physical_cores_are_unknown_where_the_kernel_does_not_say(tmp_path: Path) -> None:
    assert physical_cores([0], tmp_path) is None  # no topology
    assert physical_cores([0], topology(tmp_path / "empty", {0: ""})) is None


def test_machine_records_usable_and_physical_cores() -> None:
    recorded = machine()
    assert recorded["cores_usable"] >= 1
    physical = recorded["physical_cores"]
    assert physical is None or 1 <= physical <= recorded["cores_usable"]

"""scripts/bench_defaults.py: each row is the shapes recipe with only its feature term changed,
and the FGD/PKD pairs differ in exactly the defaults issue 32 changed."""

from __future__ import annotations

from distill.config import flatten, load_config
from tests.conftest import load_script


def test_rows_differ_from_the_recipe_only_in_the_feature_term() -> None:
    bench = load_script("bench_defaults")
    recipe = flatten(load_config(bench.RECIPE))
    rows = {
        name: flatten(load_config(bench.RECIPE, bench.row_overrides(name))) for name in bench.ROWS
    }
    for name, row in rows.items():
        changed = {k for k in recipe if recipe[k] != row[k]}
        assert changed <= {
            f"distill.feature.{k}"
            for k in ("kind", "fgd.weight", "pkd.weight", "levels", "fgd.tau", "fgd.gamma")
        }, name

    fgd_ref, fgd_before, pkd_ref, pkd_before = rows.values()
    assert (fgd_ref["distill.feature.fgd.tau"], fgd_ref["distill.feature.fgd.gamma"]) == (0.5, 5e-4)
    assert (fgd_before["distill.feature.fgd.tau"], fgd_before["distill.feature.fgd.gamma"]) == (
        1.0,
        1e-3,
    )
    assert {k for k in fgd_ref if fgd_ref[k] != fgd_before[k]} == {
        "distill.feature.fgd.tau",
        "distill.feature.fgd.gamma",
    }
    assert tuple(pkd_ref["distill.feature.levels"]) == ("p3", "p4", "p5", "p6")
    assert tuple(pkd_before["distill.feature.levels"]) == ("p3", "p4", "p5", "p6", "p7")
    assert {k for k in pkd_ref if pkd_ref[k] != pkd_before[k]} == {"distill.feature.levels"}

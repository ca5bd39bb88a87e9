"""The benchmark harness fails loudly: a method that errors is named, the others still run, exit is non-zero."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_harness_names_a_failed_method_and_exits_non_zero(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), labels=np.arange(20) % 2)
    out = tmp_path / "bench"
    # The smoke profile asks DeepCluster for 30 clusters: 20 images cannot give them.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--profile", "smoke", "--methods", "random,deepcluster",
         "--data", str(data), "--test-data", str(data), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: deepcluster" in proc.stderr
    table = (out / "results.md").read_text()
    assert "FAILED: deepcluster" in table and "k = 30 clusters but only 20 samples" in table
    random_row = next(line for line in table.splitlines() if line.startswith("| random |"))
    assert "FAILED" not in random_row


def fake_summary(runs: list[dict]) -> dict:
    return {"profile": "smoke", "selected": sorted({r["method"] for r in runs}), "runs": runs, "complete": True,
            "started": "2026-11-30T00:00:00", "host": "test", "jobs": 1, "total_wall_s": 1.0,
            "profile_train": {"data": "digits", "epochs": 2}, "profile_methods": {}}


def fake_run(method: str, seed: int, knn: float) -> dict:
    return {"method": method, "seed": seed, "status": "ok", "knn_top1": knn, "views": 1,
            "trains": method != "random", "epoch_time_median_s": 1.0, "knn_curve": [[0, 30.0], [2, knn]]}


def test_merge_pools_seeds_and_marks_gains_against_the_seed_spread(tmp_path):
    import json

    from benchmarks.run import merge_runs

    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    for folder, runs in ((day1, [fake_run("random", s, v) for s, v in ((0, 30.0), (1, 32.0), (2, 31.0))]
                          + [fake_run("npid", 0, 40.0)]),
                         (day2, [fake_run("npid", 1, 42.0), fake_run("npid", 2, 44.0),
                                 fake_run("odc", 0, 30.0), fake_run("odc", 1, 33.0), fake_run("odc", 2, 30.0)])):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(fake_summary(runs)))
    assert merge_runs([str(day1), str(day2)], tmp_path / "merged") == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "merged" / "results.json").read_text())["methods"]}
    assert rows["npid"]["knn_top1"] == 42.0 and rows["npid"]["knn_top1_std"] == 2.0  # seeds pooled across runs
    assert rows["npid"]["knn_gain"] == 11.0 and rows["npid"]["knn_gain_spread"] == 3.0  # std 2 + std 1
    assert rows["npid"]["knn_curve"] == [[0, 30.0], [2, 42.0]]
    table = (tmp_path / "merged" / "results.md").read_text()
    assert "| npid | 42.00 ± 2.00 | +11.00 (3.7x spread) |" in table
    assert "| odc | 31.00 ± 1.73 | +0.00 (within spread 2.73) |" in table


def test_merge_is_incomplete_only_when_a_source_ran_fewer_units_than_it_planned(tmp_path):
    from benchmarks.run import merge_runs

    def source(name: str, runs: list[dict], units: int, complete: bool) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(
            json.dumps({**fake_summary(runs), "units": units, "complete": complete}))
        return str(tmp_path / name)

    full = source("full", [fake_run("npid", 0, 40.0)], 1, True)
    stopped_after_last = source("late", [fake_run("npid", 1, 41.0)], 1, False)  # killed after its one unit
    stopped_early = source("early", [fake_run("odc", 0, 30.0)], 3, False)  # 1 of its 3 units ran
    merge_runs([full, stopped_after_last], tmp_path / "merged")
    assert "incomplete" not in (tmp_path / "merged" / "results.md").read_text()
    merge_runs([full, stopped_early], tmp_path / "merged2")
    assert "- **incomplete**: 2 of 4 runs done so far" in (tmp_path / "merged2" / "results.md").read_text()


def test_gain_is_paired_with_each_seeds_own_untrained_network_when_logged(tmp_path):
    import json

    from benchmarks.run import merge_runs

    runs = [fake_run("random", s, 31.0) for s in range(3)]
    for seed, (knn, before) in enumerate(((40.0, 30.0), (44.0, 33.0), (42.0, 30.0))):
        runs.append({**fake_run("is", seed, knn), "knn_untrained": before})  # the trainer's baseline row
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(fake_summary(runs)))
    merge_runs([str(tmp_path / "run")], tmp_path / "merged")
    row = next(r for r in json.loads((tmp_path / "merged" / "results.json").read_text())["methods"]
               if r["method"] == "is")
    assert row["knn_gain"] == 11.0 and row["knn_gain_spread"] == 1.0  # differences 10, 11, 12
    assert "| is | 42.00 ± 2.00 | +11.00 paired (11.0x spread) |" in (tmp_path / "merged" / "results.md").read_text()


def test_protocols_tabulates_every_method_and_seed_of_a_harness_folder_and_reruns_only_what_is_missing(
        tmp_path, trained_run):
    from benchmarks.protocols import main as protocols_main

    for seed in (0, 1):  # a harness layout: DIR/METHOD/seedS with the checkpoint and its config.yaml
        unit = tmp_path / "runs" / "npid" / f"seed{seed}"
        unit.mkdir(parents=True)
        for name in ("checkpoint.pt", "config.yaml"):
            shutil.copy(trained_run / name, unit / name)
    out = tmp_path / "proto"
    argv = [str(tmp_path / "runs"), "--out", str(out), "--episodes", "50", "--lowshot-draws", "2",
            "--layer-dim", "256"]
    assert protocols_main(argv) == 0
    summary = json.loads((out / "protocols.json").read_text())
    assert [(u["method"], u["seed"]) for u in summary["units"]] == [("npid", 0), ("npid", 1)]
    row = summary["methods"][0]
    assert row["method"] == "npid" and row["seeds"] == [0, 1]
    for key in ("linear_top1_block1", "linear_top1_block4", "linear_top1", "fewshot_5way_1shot",
                "fewshot_5way_5shot", "lowshot_map_1shot", "lowshot_map_8shot", "lowshot_map"):
        assert 10 < row[key] <= 100 and row[f"{key}_std"] == 0.0  # one checkpoint twice: the same numbers
    assert "lowshot_map_16shot" not in row  # the run's 200-image subset has a class of 13 images
    md = (out / "protocols.md").read_text()
    assert "| method | seeds | block1 | block2 | block3 | block4 | pooled |" in md
    assert "| npid | 2 | " in md and "SVM mAP mean" in md
    # a rerun evaluates only what is missing: a number planted in a unit's file survives it
    unit_file = out / "units" / "npid_seed0.json"
    planted = json.loads(unit_file.read_text()) | {"fewshot_5way_1shot": -1.0}
    unit_file.write_text(json.dumps(planted))
    assert protocols_main(argv) == 0
    assert json.loads((out / "protocols.json").read_text())["units"][0]["fewshot_5way_1shot"] == -1.0
    assert protocols_main([str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_scale_trend_pairs_seeds_fits_the_log_steps_line_and_finds_the_crossing(tmp_path):
    from benchmarks.scale_trend import analyse, read_size, trend

    # gap -4 at 100 steps, -2 at 1,000: +2 a decade, so 0 at 10,000 steps
    t = trend([(100, -4.0, 0.1), (1000, -2.0, 0.1)])
    assert t["slope_per_decade"] == pytest.approx(2.0) and t["cross_steps"] == pytest.approx(1e4)
    assert t["verdict"] == "narrows" and t["cross_to"] == "the papers' order"
    assert trend([(100, -4.0, 0.1), (1000, -2.0, 0.1)], target=-1.0)["cross_steps"] == pytest.approx(10**3.5)
    assert trend([(100, 1.0, 0.5), (1000, -1.0, 0.5)])["verdict"] == "inverts"
    assert trend([(100, -1.0, 1.0), (1000, -1.5, 1.0)])["verdict"] == "holds (within the spread)"

    def write(folder, subset, epochs, methods, sets=()):
        folder.mkdir()
        entries = [{"method": m, "status": "ok", "seeds": [0, 1], "knn_top1_values": knn, "linear_top1_values": knn}
                   for m, knn in methods.items()]
        (folder / "results.json").write_text(json.dumps({
            "profile_train": {"subset": subset, "batch_size": 128, "epochs": epochs}, "methods": entries,
            "sets": list(sets)}))
        return str(folder)

    small = write(tmp_path / "s", 1280, 10, {"pad": [40.0, 42.0], "npid": [45.0, 46.0]})
    big = write(tmp_path / "b", 12800, 10, {"pad": [50.0, 50.0], "npid": [49.0, 51.0]})
    result = analyse({"small": read_size([small]), "big": read_size([big])})
    row = next(r for r in result["pairs"] if r["pair"] == "pad - npid")
    assert row["sizes"]["small"]["steps"] == 100 and row["sizes"]["big"]["steps"] == 1000
    assert row["sizes"]["small"]["knn_top1"]["values"] == [-5.0, -4.0]  # seed against seed
    assert row["knn_top1_trend"]["slope_per_decade"] == pytest.approx(4.5)
    assert "pad - and" in [r["pair"] for r in result["pairs"]] and not row["sizes"].get("x")
    with_warmup = write(tmp_path / "w", 1280, 10, {"pcp": [50.0, 50.0], "is": [49.0, 51.0]})
    with pytest.raises(SystemExit, match="warmup=false"):
        analyse({"small": read_size([with_warmup])})


def test_recipe_table_pairs_the_own_recipe_with_the_shared_protocol_seed_by_seed():
    from benchmarks.recipe_table import compare

    def entry(method, knn, gain):
        return {"method": method, "seeds": [0, 1], "knn_top1_values": knn, "linear_top1_values": knn,
                "nmi_values": [0.1, 0.2], "knn_gain": gain, "knn_gain_spread": 0.5}

    shared = {"odc": entry("odc", [30.0, 32.0], -2.0), "is": entry("is", [60.0, 60.0], 26.0)}
    own = {"odc": entry("odc", [34.0, 35.0], 1.5)}
    (row,) = compare(shared, own)
    assert row["method"] == "odc" and row["knn_top1"]["diff"] == pytest.approx((3.5, 0.5**0.5))
    assert row["knn_top1"]["own"] == pytest.approx((34.5, 0.5**0.5)) and row["gain"]["own"] == (1.5, 0.5)

"""tools/bench.py runs and writes its JSON keys (toy sizes, seconds).

No timing is asserted here: performance targets are checked by running the benchmark itself
(`python tools/bench.py`), never in unit tests.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from utils import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fixedcls_bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOY_RUN = [o for o in TINY if not o.startswith(("trainer.epochs", "trainer.progress"))]
FIGURES = ("step_ratio_fixed_vs_learned", "loop_overhead_vs_plain", "collapse_overhead_online",
           "collapse_overhead_exact", "agop_overhead", "nc_metrics_speedup_vs_naive",
           "nc_metrics_speedup_vs_float32_streaming")


def test_alternate_rotates_and_ratios_are_medians(bench):
    calls = []
    times = bench.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order flips every round, warm-up included
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert bench.median_ratio({"a": [2.0, 9.0, 3.0], "b": [1.0, 1.0, 1.0]}, "a", "b") == 3.0
    assert bench.verdict("step_ratio_fixed_vs_learned", 1.01) == "PASS"
    assert bench.verdict("nc_metrics_speedup_vs_naive", 3.0) == "MISS"


def test_ratio_stats_report_the_spread_of_the_rounds_and_the_ratio_of_medians(bench):
    times = {"fit": [2.0, 3.0, 2.2, 2.1, 9.0], "plain": [2.0, 2.0, 2.0, 2.0, 2.0]}
    stats = bench.ratio_stats(times, "fit", "plain")
    # per-round ratios 1.0, 1.5, 1.1, 1.05, 4.5: median 1.1, quartiles 1.05 and 1.5; medians 2.2 / 2.0
    assert stats["median"] == pytest.approx(1.1) and stats["median"] == bench.median_ratio(times, "fit", "plain")
    assert (stats["q1"], stats["q3"]) == (pytest.approx(1.05), pytest.approx(1.5))
    assert stats["iqr"] == pytest.approx(0.45) and stats["ratio_of_medians"] == pytest.approx(1.1)
    assert bench.ratio_stats({"a": [3.0], "b": [2.0]}, "a", "b", scale=2.0) == {
        "median": 3.0, "q1": 3.0, "q3": 3.0, "iqr": 0.0, "rounds": 1, "ratio_of_medians": 3.0}
    out: dict = {}
    bench.add_figure(out, "loop_overhead_vs_plain", times, {"fit": [1.0] * 5, "plain": [2.0] * 5}, "fit", "plain")
    assert out["loop_overhead_vs_plain"] == pytest.approx(1.1) and out["cpu_ratios"]["loop_overhead_vs_plain"] == 0.5
    assert out["ratio_stats"]["loop_overhead_vs_plain"] == stats
    table = bench.format_table(out)
    assert "IQR of rounds" in table.splitlines()[0] and "0.450" in table


def test_step_benchmark_runs(bench):
    out = bench.bench_step(backbone="test_resnet", img_size=16, in_chans=3, num_classes=4, batch_size=4,
                           device=torch.device("cpu"), steps=1, rounds=1, warmup=0)
    assert out["step_ratio_fixed_vs_learned"] > 0 and out["images_per_second_fixed"] > 0
    assert out["settings"]["dim_fixed"] == 3  # natural simplex dimension, K - 1


def test_nc_metrics_benchmark_checks_equal_values(bench):
    # d = 300 takes the accumulator's float32 products and its blocked scatter (d > 256); d = 16 the float64 ones.
    for N, d, K in ((400, 300, 150), (300, 16, 5)):
        out = bench.bench_nc_metrics(N=N, d=d, K=K, naive_samples=N // 2, rounds=2, warmup=0)
        assert out["nc_metrics_equal"], out["nc_metrics_max_rel_diff"]
        assert out["settings"]["naive_scaled"] and "scaled linearly" in out["note_naive"]
        # the float32 contender ran in the same alternation, on all N samples, and computes the same measures
        assert len(out["raw"]["float32"]) == len(out["raw"]["nc_metrics"]) == 2
        key = "nc_metrics_speedup_vs_float32_streaming"
        assert out[key] == bench.median_ratio(out["raw"], "float32", "nc_metrics") > 0 and out["cpu_ratios"][key] > 0
        assert 0 <= out["float32_streaming_max_rel_diff"] < 1e-3
        assert out["medians"]["float32_streaming_s"] > 0


def test_float32_contender_matches_nc_metrics_where_float32_suffices(bench):
    from fixedcls.collapse import METRIC_KEYS, nc_metrics

    h, y, W, b = bench.collapse_features(3000, 96, 12, seed=3)
    y[y == 11] = 10  # an absent class: left out by both
    fast, f32 = nc_metrics(h, y, W, b), bench.load_float32().float32_nc_metrics(h, y, W, b, batch_size=256)
    assert set(METRIC_KEYS) <= set(f32)
    assert bench.max_rel_diff(fast, f32) < 1e-5


def test_memory_figure(bench):
    out = bench.bench_memory(N=1000, d=32, K=10, batch=64)
    assert out["stored_features_mb"] == pytest.approx(1000 * 32 * 4 / 2**20)
    assert 0 < out["collapse_memory_mb"] and out["memory_ratio_features_over_measurer"] > 0


def test_main_writes_every_key(bench, tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--backbone", "test_resnet", "--rounds", "1", "--warmup", "0", "--steps", "1",
            "--nc-n", "300", "--nc-d", "16", "--nc-k", "5", "--naive-samples", "100", "--json", str(path),
            "--scale-k", "64,128", "--scale-d", "16"]
    for override in TOY_RUN:
        argv += ["--override", override]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads(path.read_text())
    for key in FIGURES + ("collapse_memory_mb", "stored_features_mb", "memory_ratio_features_over_measurer",
                          "images_per_second_fixed", "images_per_second_learned"):
        assert isinstance(results[key], float) and math.isfinite(results[key]), key
        assert key in table
    assert results["nc_metrics_equal"] is True
    assert "float32 streaming vs nc_metrics" in table and results["float32_streaming_max_rel_diff"] < 1e-3
    assert {"cpu", "cores", "torch", "device"} <= set(results["machine"])
    assert {"epoch_s_fit", "epoch_s_fit_nowrite", "epoch_s_plain", "epoch_s_fit_online", "epoch_s_fit_exact",
            "step_s_fixed", "step_s_learned", "nc_metrics_s", "naive_s", "float32_streaming_s"} <= set(results["medians"])
    # every ratio figure carries its spread over the rounds and the ratio of the contenders' medians
    assert set(FIGURES) | {"loop_with_checkpoints_vs_plain"} <= set(results["ratio_stats"])
    assert all({"iqr", "ratio_of_medians"} <= set(stats) for stats in results["ratio_stats"].values())
    # the durable checkpoint write is its own figure (fit - fit without writes), with a step-by-step breakdown
    assert math.isfinite(results["checkpoint_write_s_per_epoch"]) and "checkpoint_write_s_per_epoch" in table
    assert {"snapshot_copy_fresh", "snapshot_copy_reused", "serialise", "crc32", "page_cache_write", "fsync",
            "atomic_save", "links"} <= set(results["checkpoint_write_ms"])
    assert results["checkpoint_write_ms"]["bytes"] > 0
    assert set(FIGURES) <= set(results["targets"]) and results["quick"] is True
    assert any("scaled linearly" in note for note in results["notes"])
    # the scale section: one fresh process per K, its seconds and peak RSS, and the growth exponent
    assert [point["K"] for point in results["scale"]] == [64, 128]
    assert all(point["seconds"] > 0 and point["peak_rss_mb"] >= point["rss_before_call_mb"] > 0 for point in results["scale"])
    assert math.isfinite(results["scale_time_exponent"]) and math.isfinite(results["scale_rss_exponent"])
    assert "nc_metrics K=128, d=16" in table and "growth exponent in K of the peak RSS" in table


def test_workers_figure_runs_from_the_command_line(bench, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--only", "workers", "--workers-images", "40", "--rounds", "1", "--warmup", "0",
                       "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert math.isfinite(results["workers_epoch_speedup_persistent"]) and results["workers_epoch_speedup_persistent"] > 0
    assert {"epoch_s_workers_persistent", "epoch_s_workers_respawn"} <= set(results["medians"])
    assert results["settings"]["workers"]["num_workers"] == 2 and results["settings"]["workers"]["test_images"] == 8
    assert "workers_epoch_speedup_persistent" in capsys.readouterr().out


def test_the_respawning_contender_loads_what_the_persistent_loader_loads(bench):
    """Both contenders of the workers figure must do the same work: same samples, order and augmentation."""
    import numpy as np

    from fixedcls.data.datasets import DataBundle
    from fixedcls.data.loaders import create_loaders
    from fixedcls.data.transforms import random_shift

    def shifted(image):  # random: a sample augmented for another epoch or seed would differ
        return random_shift(4)(torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float())

    images = bench.CifarSizedImages(24, shifted)
    bundle = DataBundle(train=images, train_eval=images, test=images, num_classes=10, in_chans=3, img_size=32,
                        class_names=[str(c) for c in range(10)])
    persistent, _, _ = create_loaders(bundle, batch_size=8, eval_batch_size=8, num_workers=2, seed=3)
    respawned = bench.respawning(persistent)
    assert persistent.persistent_workers and not respawned.persistent_workers
    for epoch in (0, 1):
        persistent.sampler.set_epoch(epoch)
        kept, fresh = [x for x, _ in persistent], [x for x, _ in respawned]
        assert len(kept) == 3 and all(torch.equal(a, b) for a, b in zip(kept, fresh))


def test_other_processes_load_excludes_the_benchmark_itself(bench, monkeypatch):
    import time

    # 10 s of wall time in which the machine was busy for 25 CPU-seconds, 18 of them this process's own
    wall_start = time.perf_counter() - 10.0
    monkeypatch.setattr(bench, "_machine_busy_seconds", lambda: 1025.0)
    other = bench.other_processes_load((2.0, 1000.0), 20.0, wall_start)
    assert other == pytest.approx(0.7, rel=1e-3)
    assert bench.other_processes_load((2.0, None), 20.0, wall_start) is None  # no /proc/stat: unknown, not zero


def test_machine_busy_seconds_reads_proc_stat(bench):
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    first = bench._machine_busy_seconds()
    assert first is not None and first > 0 and bench._machine_busy_seconds() >= first


FAKE_RUN = r'''
import json, os, sys, time
from pathlib import Path
# A stand-in for fixedcls-train: it sleeps 0.3 s (sharing nothing), and reports an epoch time that depends on
# the spin count it was given, so the figures' arithmetic is checked against known values.
time.sleep(0.3)
folder = Path("outputs/run/now"); folder.mkdir(parents=True, exist_ok=True)
epoch = 2.0 if os.environ.get("GOMP_SPINCOUNT") == "300000" else 2.1
(folder / "summary.json").write_text(json.dumps({"time/train_s_per_epoch": epoch}))
sweep = "-m" in sys.argv and "hydra/launcher=basic" in sys.argv
time.sleep(0.3 if sweep else 0.0)  # a sequential two-job sweep takes twice as long as a parallel one
'''


def test_the_share_figure_compares_runs_at_once_with_runs_one_after_the_other(bench, monkeypatch, tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_RUN)
    monkeypatch.setattr(bench.share_cores, "_command", lambda: [sys.executable, str(fake)])
    out = bench.bench_share(rounds=1)
    assert out["share_lone_epoch_vs_spinning"] == pytest.approx(2.1 / 2.0)
    assert out["share_at_once_vs_one_after_other"] == pytest.approx(0.5, abs=0.2)  # two 0.3 s sleeps overlap
    assert out["share_sweep_parallel_vs_sequential"] == pytest.approx(0.5, abs=0.2)
    assert bench.verdict("share_lone_epoch_vs_spinning", out["share_lone_epoch_vs_spinning"]) == "MISS"

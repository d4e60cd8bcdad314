"""tools/gpu_check.py on a CPU-only machine: the smoke run's JSON, the CUDA sections it skips and why, and a
failed section that leaves the others running and the exit status non-zero.

The smoke run is started as a user starts it (a subprocess; conftest.py hides any GPU from it, so this is what
a CPU-only machine does); no timing is asserted, figures are only checked to exist.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"
TIMEOUT = 240


def run_check(tmp_path: Path, *args: str) -> tuple[int, dict, str]:
    """(exit status, the JSON it wrote, its stderr) of `gpu_check.py --device cpu --smoke <args>`."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", TMPDIR=str(tmp_path))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--json", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.is_file(), proc.stderr[-4000:]
    return proc.returncode, json.loads(out.read_text()), proc.stderr


def test_cpu_smoke_runs_every_cpu_section_and_names_each_skipped_cuda_section(tmp_path):
    code, report, stderr = run_check(tmp_path, "--nproc", "1", "--only", "train/fp32,train/fp16,ddp,step/*,loop/*")
    assert code == 0, report["failed"]
    assert report["failed"] == [] and report["smoke"] is True
    assert report["device_name"] and report["environment"]["torch"] == torch.__version__
    assert report["environment"]["device_count"] == 0 and report["seconds"] > 0
    sections = report["sections"]
    assert list(sections)[:4] == ["train/fp32", "train/bf16", "train/fp16", "ddp"]  # the plan's order, every section listed

    train = sections["train/fp32"]
    assert train["status"] == "ok" and train["seconds"] > 0
    result = train["results"]
    assert result["exit_code"] == 0 and result["epochs"] == 2 and "fixedcls.commands.train" in result["command"]
    assert 0.0 <= result["test/acc"] <= 1.0 and result["collapse/nc1"] > 0 and result["collapse_test/nc1"] > 0

    ddp = sections["ddp"]["results"]
    assert sections["ddp"]["status"] == "ok" and ddp["matches_tests"] is True
    assert ddp["checks"] and all(ddp["checks"].values()) and ddp["collapse_measures_compared"] > 0
    assert (ddp["nproc"], ddp["backend"]) == (1, "gloo") and "world of one" in ddp["note"]

    step = sections["step/bf16/eager"]["results"]
    assert step["images_per_second_fixed"] > 0 and step["images_per_second_learned"] > 0
    assert step["settings"]["precision"] == "bf16" and step["settings"]["channels_last"] is True
    assert step["settings"]["compile"] is False
    loop = sections["loop/bf16/eager"]["results"]
    for figure in ("loop_overhead_vs_plain", "collapse_overhead_online", "collapse_overhead_exact", "agop_overhead"):
        assert loop[figure] > 0, figure
    assert loop["settings"]["precision"] == "bf16" and loop["settings"]["device"] == "cpu"

    skipped = report["skipped"]
    for name in ("train/fp16", "step/fp16/eager", "loop/fp16/eager", "step/fp16/compile", "loop/fp16/compile"):
        assert sections[name]["status"] == "skipped" and "fp16 needs CUDA" in skipped[name]
        assert f"skip {name}: fp16 needs CUDA" in stderr
    for name in ("step/bf16/compile", "loop/bf16/compile"):
        assert "torch.compile is skipped in a CPU smoke run" in skipped[name] and f"skip {name}: torch.compile" in stderr
    assert skipped["train/bf16"].startswith("not selected by --only")
    # the headline figures of each section that ran, gathered in one place
    assert set(report["figures"]) == {"train/fp32", "ddp", "step/bf16/eager", "loop/bf16/eager"}
    assert report["figures"]["train/fp32"]["test/acc"] == result["test/acc"]
    assert report["figures"]["loop/bf16/eager"]["collapse_overhead_exact"] == loop["collapse_overhead_exact"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("fixedcls_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_budget_stops_the_running_section_and_skips_the_rest(gpu_check, tmp_path):
    ran = []
    sections = [gpu_check.Section("quick", lambda folder: ran.append(folder.name) or {"x": 1}),
                gpu_check.Section("slow", lambda folder: time.sleep(30)),
                gpu_check.Section("after", lambda folder: ran.append(folder.name) or {}),
                gpu_check.Section("cpu_only", lambda folder: {}, skip="a reason decided up front")]
    reported = []  # the outcomes known each time the report would be written
    started = time.perf_counter()
    gpu_check.run_sections(sections, budget_s=1.0, workdir=tmp_path,
                           after_each=lambda: reported.append([s.name for s in sections if s.outcome]))
    assert time.perf_counter() - started < 10  # the sleeping section was stopped at the budget
    outcome = {s.name: s.outcome for s in sections}
    assert ran == ["quick"] and outcome["quick"]["status"] == "ok" and outcome["quick"]["results"] == {"x": 1}
    assert outcome["slow"]["status"] == "skipped" and outcome["slow"]["reason"].startswith("time budget (1 s): stopped after")
    assert outcome["after"] == {"status": "skipped", "reason": "time budget (1 s spent)"}
    assert outcome["cpu_only"] == {"status": "skipped", "reason": "a reason decided up front"}
    assert reported == [["quick"], ["quick", "slow"], ["quick", "slow", "after"], ["quick", "slow", "after", "cpu_only"]]


@pytest.mark.parametrize("argv,message", [(["--device", "cpu"], "add --smoke"), (["--budget-s", "0"], "positive"),
                                          (["--nproc", "0"], "at least 1"), (["--device", "tpu"], "invalid choice")])
def test_usage_errors_exit_2_with_one_line(gpu_check, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_failed_section_is_one_line_the_next_runs_and_the_exit_status_is_one(gpu_check, tmp_path, capsys):
    # In this process (main is the script's entry point): the override reaches the run the loop section
    # builds and fails its config check; the step section builds no run and still runs after it.
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--smoke", "--json", str(out), "--only", "loop/bf16/eager,step/bf16/eager",
                           "--override", "trainer.no_such_key=1"])
    report = json.loads(out.read_text())
    assert code == 1 and report["failed"] == ["loop/bf16/eager"]
    failure = report["sections"]["loop/bf16/eager"]
    assert failure["status"] == "failed" and "no_such_key" in failure["error"] and "\n" not in failure["error"]
    assert "loop/bf16/eager: failed" in capsys.readouterr().err
    assert report["sections"]["step/bf16/eager"]["status"] == "ok"
    assert set(report["figures"]) == {"step/bf16/eager"}  # figures only from sections that passed

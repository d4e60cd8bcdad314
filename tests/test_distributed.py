"""DDP and cluster launches on CPU: torchrun with gloo in real processes, sharding, launcher configs, preemption.

The 2-process run must write one run directory (no per-rank Hydra dirs) and one checkpoint set, and its
collapse measures must equal a 1-process measurement of the saved checkpoint on the same data, on both paths:
a seeded subset (collapse.max_samples) and the default exact one, whose test-split pass 1 rides on evaluation.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fixedcls.training import distributed as fd
from fixedcls.collapse import measure_model
from fixedcls.collapse.measure import _subset_loader
from fixedcls.data.datasets import create_data
from fixedcls.data.loaders import EpochSampler, create_loaders
from utils import CONF_DIR, compose_config

# Odd split sizes on purpose: 36 training samples (18 per rank, batches of 16 + 2), 15 test samples
# (uneven eval shards 8 + 7), a 25-sample collapse subset (13 + 12). Evaluation batches of one sample:
# CPU convolutions round differently for other batch shapes (~1e-6 relative on an ill-conditioned nc1),
# and the comparison is about sharding, reduction and batch-norm statistics, not float32 kernels.
DDP_OVERRIDES = [
    "model.backbone=test_resnet", "data=synthetic", "data.num_classes=3", "data.img_size=16",
    "data.train_per_class=13", "data.test_per_class=5", "data.batch_size=16", "data.eval_batch_size=1",
    "trainer.epochs=2", "trainer.progress=false", "trainer.device=cpu", "collapse.max_samples=25",
]  # 13 per class, 1 of which the validation split holds (sharded like the test split): 36 training samples
# The default exact collapse path (no collapse.max_samples): the test split's pass 1 rides on its evaluation,
# and its class means must be summed over the ranks before pass 2.
EXACT_OVERRIDES = [o for o in DDP_OVERRIDES if not o.startswith("collapse.max_samples=")] + [
    "trainer.epochs=1", "collapse.plot=false"]
LAUNCH_TIMEOUT = 240


def _child_env(tmp_path: Path) -> dict:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", WANDB_MODE="disabled",
               HYDRA_FULL_ERROR="1", TMPDIR=str(scratch))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR"):
        env.pop(key, None)
    return env


class Launch:
    """A command started in its own directory and process group; `wait()` checks it exited 0."""

    def __init__(self, cmd: list[str], directory: Path):
        self.cmd, self.directory, self.started = cmd, directory, time.perf_counter()
        self.log = (directory / "launch.log").open("w")
        self.process = subprocess.Popen(cmd, cwd=directory, env=_child_env(directory), stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.seconds = None

    def wait(self) -> Path:
        try:
            code = self.process.wait(timeout=max(1.0, LAUNCH_TIMEOUT - (time.perf_counter() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            code = "timeout"
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.started
        self.log.close()
        output = (self.directory / "launch.log").read_text()
        assert code == 0, f"{' '.join(self.cmd)} -> {code}\n{output[-6000:]}"
        return self.directory

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the launcher and the ranks it started
            self.process.wait()


def _has_submitit() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Both multi-process launches start at once (mostly interpreter start-up and imports): a torchrun
    run of 2 gloo processes, and a submitit local job of 2 tasks (when the slurm extra is installed)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "fixedcls.commands.train"]
    started = {"torchrun": Launch([*torchrun, *DDP_OVERRIDES], tmp_path_factory.mktemp("torchrun")),
               "torchrun_exact": Launch([*torchrun, *EXACT_OVERRIDES], tmp_path_factory.mktemp("torchrun_exact"))}
    if _has_submitit():
        sweep = tmp_path_factory.mktemp("submitit")
        started["submitit"] = Launch([
            sys.executable, "-m", "fixedcls.commands.train", "-m", "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep / 'multirun'}",
            *DDP_OVERRIDES, "trainer.epochs=1", "collapse.plot=false", "collapse.splits=[test]"], sweep)
    yield started
    for launch in started.values():
        launch.kill()


# ---------------------------------------------------------------------------------------------------
# torchrun: 2 processes (gloo) == 1 process
# ---------------------------------------------------------------------------------------------------
def test_torchrun_two_processes_one_run_dir_and_same_measures_as_one_process(launches):
    tmp_path = launches["torchrun"].wait()
    launch_seconds = launches["torchrun"].seconds

    # One run directory (rank 0's, Hydra's default outputs/<name>/<time stamp>) and nothing from rank 1.
    metrics = sorted(tmp_path.rglob("metrics.jsonl"))
    assert len(metrics) == 1, metrics
    run_dir = metrics[0].parent
    assert run_dir.parent.parent == tmp_path / "outputs"
    assert sorted(p.parent for p in tmp_path.rglob(".hydra")) == [run_dir]
    assert len(list((tmp_path / "outputs").rglob("*.log"))) == 1
    assert (run_dir / "summary.json").is_file() and (run_dir / "collapse.png").is_file()
    assert not list((tmp_path / "tmp").glob("fixedcls-rank*")), "rank 1's scratch Hydra dir was not removed"
    ckpt_dirs = [d for d in (tmp_path / "checkpoints").iterdir()]
    assert len(ckpt_dirs) == 1
    assert sorted(p.name for p in ckpt_dirs[0].iterdir()) == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt", "run.json"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["run_dir"]).resolve() == run_dir.resolve()  # every rank got rank 0's run dir

    rows = [json.loads(line) for line in metrics[0].read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    last = rows[-1]

    # A 1-process measurement of the saved checkpoint on the same data.
    cfg, bundle, model, state = _one_process_model(DDP_OVERRIDES, ckpt_dirs[0] / "last.pt")
    assert (state["epoch"], state["global_step"]) == (2, 4)  # 18 samples per rank: 2 steps per epoch (1 process: 3)
    # Each rank's own RNG stream (its own dropout masks), saved so a resume restores every rank's.
    assert len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    assert torch.equal(state["rng_ranks"][0]["torch"], state["rng"]["torch"])
    _, train_eval, test = create_loaders(bundle, batch_size=16, eval_batch_size=1, seed=cfg.seed)
    cpu = torch.device("cpu")
    for prefix, loader in (("collapse/", train_eval), ("collapse_test/", test)):
        single = measure_model(model, loader, device=cpu, max_samples=25)
        assert single, prefix
        for key, value in single.items():
            assert last[prefix + key] == pytest.approx(value, rel=1e-6, abs=1e-6), (prefix + key, last[prefix + key], value)

    # Test and validation loss/accuracy over the uneven, unpadded eval shards count every sample once.
    model.eval()
    for split, dataset in (("test", bundle.test), ("val", bundle.val)):
        with torch.no_grad():
            x = torch.stack([dataset[i][0] for i in range(len(dataset))])
            y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
            logits = model(x)
        assert last[f"{split}/acc"] == pytest.approx(int((logits.argmax(1) == y).sum()) / len(y), abs=1e-12)
        assert last[f"{split}/loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    print(f"torchrun 2-process launch: {launch_seconds:.1f}s")


def _one_process_model(overrides: list[str], checkpoint: Path):
    """(config, data, model with the checkpoint's weights, checkpoint state) of a run of `overrides`, in this process."""
    from fixedcls.models.classifier import create_model

    cfg = compose_config(overrides, tiny=False)
    bundle = create_data(cfg.data)
    model = create_model(cfg.model.backbone, cfg.head.name, bundle.num_classes, dim=cfg.model.dim,
                         in_chans=bundle.in_chans, img_size=bundle.img_size)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return cfg, bundle, model, state


def test_torchrun_exact_collapse_of_the_test_split_equals_one_process(launches):
    """The default exact path: the test split's class means come from each rank's evaluation shard (8 + 7
    samples) and must be summed over the ranks; a rank that kept its own shard's means would measure another
    scatter."""
    tmp_path = launches["torchrun_exact"].wait()
    row = json.loads(next(tmp_path.rglob("metrics.jsonl")).read_text().splitlines()[-1])
    closing = (tmp_path / "launch.log").read_text()
    assert closing.count("evaluate the model:  fixedcls-eval checkpoints/") == 1  # said once, by rank 0
    cfg, bundle, model, _ = _one_process_model(EXACT_OVERRIDES, next((tmp_path / "checkpoints").glob("*/last.pt")))
    _, train_eval, test = create_loaders(bundle, batch_size=16, eval_batch_size=1, seed=cfg.seed)
    for prefix, loader in (("collapse/", train_eval), ("collapse_test/", test)):
        single = measure_model(model, loader, device=torch.device("cpu"))
        assert "nc1" in single and "nc2_etf_error" in single, prefix
        for key, value in single.items():
            assert row[prefix + key] == pytest.approx(value, rel=1e-6, abs=1e-6), (prefix + key, row[prefix + key], value)


# ---------------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length,world_size", [(15, 2), (36, 2), (10, 3), (2, 3)])
def test_epoch_sampler_shards(length, world_size):
    train = [EpochSampler(length, shuffle=True, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for sampler in train:
        sampler.set_epoch(4)
    shards = [sampler.epoch_indices() for sampler in train]
    assert len({len(s) for s in shards}) == 1  # padded: every rank runs the same number of steps
    assert set().union(*shards) == set(range(length))
    evals = [list(EpochSampler(length, shuffle=False, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(i for shard in evals for i in shard) == list(range(length))  # disjoint, unpadded, complete


@pytest.mark.parametrize("length,world_size,batch_size", [(17, 1, 8), (33, 2, 16), (10, 3, 3), (16, 1, 8)])
def test_epoch_sampler_never_ends_an_epoch_on_a_one_sample_batch(length, world_size, batch_size):
    samplers = [EpochSampler(length, shuffle=True, seed=1, rank=r, world_size=world_size, batch_size=batch_size)
                for r in range(world_size)]
    seen: set = set()
    for epoch in range(6):
        shards = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            shards.append(sampler.epoch_indices())
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == samplers[0].num_samples
        assert len(shards[0]) % batch_size != 1  # last batch: 0 (full) or at least 2 samples
        flat = [i for shard in shards for i in shard]
        assert len(set(flat)) == min(len(flat), length) and set(flat) <= set(range(length))
        seen.update(flat)
    assert seen == set(range(length))  # the sample left out changes with the epoch


def test_collapse_subset_loader_reshards_disjoint_unpadded():
    dataset = torch.utils.data.TensorDataset(torch.arange(40), torch.arange(40) % 4)  # x = the sample's index

    def indices(loader) -> list[int]:
        return [int(i) for x, _ in loader for i in x]

    shards = []
    for rank in range(3):
        loader = torch.utils.data.DataLoader(dataset, batch_size=4,
                                             sampler=EpochSampler(40, shuffle=False, rank=rank, world_size=3))
        shards.append(indices(_subset_loader(loader, 25, seed=0)))
    single = indices(_subset_loader(torch.utils.data.DataLoader(dataset, batch_size=4), 25, seed=0))
    assert len(single) == 25 and sorted(i for shard in shards for i in shard) == sorted(single)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ---------------------------------------------------------------------------------------------------
# launch environments
# ---------------------------------------------------------------------------------------------------
_LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
                "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NODELIST",
                "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST")


@pytest.fixture
def clean_env(monkeypatch):
    # export_env() writes RANK/WORLD_SIZE/... straight into os.environ, which monkeypatch does not
    # undo; a leak would make every later in-process training test wait for a process group.
    saved = dict(os.environ)
    for key in _LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_single_process_and_torchrun_env(clean_env):
    assert fd.launch_env() is None and fd.process_rank() == 0
    assert fd.init_world("cpu") == fd.World()
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    assert fd.launch_env() is None
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "8")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")  # torchrun inside srun: torchrun's ranks win
    clean_env.setenv("SLURM_PROCID", "0")
    env = fd.launch_env()
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 8, 1)


def test_submitit_task_env(clean_env):
    pytest.importorskip("submitit", reason="submitit comes with the slurm extra: pip install -e '.[slurm]'")
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        clean_env.setenv(key, value)
    env = fd.launch_env()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.master_addr) == ("submitit", 1, 2, 1, "127.0.0.1")
    assert env.master_port == fd.launch_env().master_port and 20000 <= env.master_port <= 60000
    fd.export_env(env)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert fd.launch_env().source == "torchrun"  # once exported, the same variables as torchrun's


def test_srun_step_env(clean_env):
    clean_env.setenv("SLURM_JOB_NUM_NODES", "2")  # sbatch --ntasks=8 without srun: still one process
    clean_env.setenv("SLURM_PROCID", "0")
    assert fd.launch_env() is None
    for key, value in {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                       "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "77"}.items():
        clean_env.setenv(key, value)
    env = fd.launch_env()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("srun", 5, 8, 1, 4)
    assert env.master_addr == "gpu003"
    assert fd.first_host("node7,cpu[1-2]") == "node7" and fd.first_host("a[09,11-12]") == "a09"


def test_worker_hydra_args_rank_above_zero(clean_env, tmp_path):
    clean_env.setenv("TMPDIR", str(tmp_path))
    argv = ["train", "-m", "seed=0,1", "hydra.run.dir=mine", "hydra/job_logging=stdout"]
    with fd.worker_hydra_args(argv) as scratch:
        assert scratch is None and argv[-1] == "hydra/job_logging=stdout"  # rank 0: untouched
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    original = list(argv)
    with fd.worker_hydra_args(argv) as scratch:
        assert Path(scratch).is_dir()
        assert argv[:3] == ["train", "-m", "seed=0,1"] and "hydra.run.dir=mine" not in argv
        assert f"hydra.run.dir={scratch}" in argv and f"hydra.sweep.dir={scratch}" in argv
        assert set(fd.WORKER_OVERRIDES) <= set(argv) and "hydra/job_logging=stdout" not in argv
    assert argv == original and not Path(scratch).exists()


# ---------------------------------------------------------------------------------------------------
# preemption signals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
def test_preemption_signal_is_caught_then_chained_to_the_launcher_handler(tmp_path):
    from fixedcls.commands.cli import stop_after_interrupt as _stop_after_interrupt
    from fixedcls.training.signals import STOP_SIGNALS, StopSignals, TrainingInterrupted

    assert signal.SIGUSR2 in STOP_SIGNALS and signal.SIGUSR1 in STOP_SIGNALS  # submitit >= 1.5 preempts with USR2
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.received == signal.SIGUSR2 and calls == []  # ours first: save at the next step
        with pytest.raises(SystemExit) as exit_info:
            _stop_after_interrupt(TrainingInterrupted(signal.SIGUSR2, tmp_path / "last.pt"))
        assert calls == [signal.SIGUSR2]  # then submitit's requeue handler
        assert exit_info.value.code == 128 + signal.SIGUSR2
        with pytest.raises(SystemExit):
            _stop_after_interrupt(TrainingInterrupted(signal.SIGTERM, None))
        assert calls == [signal.SIGUSR2]  # SIGTERM is not chained
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ---------------------------------------------------------------------------------------------------
# Hydra launchers
# ---------------------------------------------------------------------------------------------------
def _compose_hydra(overrides: list[str]):
    from fixedcls.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("launcher,target", [
    ("slurm", "SlurmLauncher"), ("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher"),
    ("parallel", "JoblibLauncher"), ("joblib", "JoblibLauncher"),
])
def test_launcher_configs_compose(launcher, target):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e '.[slurm]'")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs the slurm extra: pip install -e '.[slurm]'")
    cfg = _compose_hydra([f"hydra/launcher={launcher}", "resume=auto"])
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.resume == "auto"
    if launcher == "slurm":
        cfg = _compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
                              "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=60"])
        launcher_cfg = cfg.hydra.launcher
        assert (launcher_cfg.partition, launcher_cfg.nodes, launcher_cfg.timeout_min) == ("gpu", 2, 60)
        assert launcher_cfg.tasks_per_node == 4  # one DDP process per GPU
        assert launcher_cfg.signal_delay_s > 0 and launcher_cfg.max_num_timeout > 0
    if launcher == "parallel":
        assert cfg.hydra.launcher.n_jobs == 2


def test_submitit_local_launch_two_tasks(launches):
    """A real submitit job (local executor, offline) of 2 tasks: a DDP world from submitit's JobEnvironment."""
    if "submitit" not in launches:
        pytest.skip("hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")
    tmp_path = launches["submitit"].wait()
    sweep = tmp_path / "multirun"
    metrics = sorted(tmp_path.rglob("metrics.jsonl"))
    assert metrics == [sweep / "0" / "metrics.jsonl"]
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1] and "collapse_test/nc1" in rows[0]
    assert len(sorted((sweep / ".submitit").rglob("*_log.err"))) == 2  # two tasks of one job
    ckpt_dirs = list((tmp_path / "checkpoints").iterdir())
    assert len(ckpt_dirs) == 1
    # 36 samples, batches of 16: 2 steps per epoch on each of 2 ranks (one process would take 3).
    assert torch.load(ckpt_dirs[0] / "last.pt", weights_only=True)["global_step"] == 2


# ---------------------------------------------------------------------------------------------------
# ranks agree: a non-finite loss on one rank, each rank's RNG on resume (2 spawned gloo processes)
# ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, tmp_path: str, overrides: list, nan_on_rank: int, out: str) -> None:
    """One rank of a 2-process run of `train.train` (env:// rendezvous, like torchrun); writes what it saw to `out`."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import fixedcls.training.loop as engine
    import fixedcls.training.assemble as train_module
    from fixedcls.errors import FixedclsError

    restored = []
    real_set_rng_state = engine.set_rng_state
    engine.set_rng_state = lambda state: (restored.append(state["torch"].clone()), real_set_rng_state(state))[1]
    if nan_on_rank == rank:  # this rank alone sees a non-finite loss from its second step on
        import fixedcls.training.factories as build_module

        real_criterion = build_module.create_criterion

        def create_criterion(*args, **kwargs):
            criterion, calls = real_criterion(*args, **kwargs), [0]

            def poisoned(logits, y):
                calls[0] += 1
                loss = criterion(logits, y)
                return loss * float("nan") if calls[0] >= 2 else loss
            return poisoned
        build_module.create_criterion = create_criterion
    result: dict = {"rank": rank}
    try:
        train_module.train(compose_config(overrides, tmp_path=Path(tmp_path)), Path(tmp_path) / "run")
        result["outcome"] = "finished"
    except FixedclsError as error:
        result["outcome"] = f"FixedclsError: {error}"
    result["restored"] = [t.tolist() for t in restored]
    Path(out).write_text(json.dumps(result))


def _run_two_ranks(tmp_path: Path, overrides: list, nan_on_rank: int = -1, timeout: float = 180) -> list[dict]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    port = _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    for out in outs:
        out.unlink(missing_ok=True)
    processes = [context.Process(target=_rank_main, args=(r, port, str(tmp_path), overrides, nan_on_rank, str(outs[r])))
                 for r in range(2)]
    for process in processes:
        process.start()
    deadline = time.perf_counter() + timeout
    for process in processes:
        process.join(max(1.0, deadline - time.perf_counter()))
    hung = [p.pid for p in processes if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still running after {timeout:.0f}s: the ranks did not agree and one waits forever"
    return [json.loads(out.read_text()) for out in outs]


RANKS_OVERRIDES = ["trainer.device=cpu", "data.num_classes=3", "data.train_per_class=12", "data.batch_size=6",
                   "collapse.every=0", "model.drop_rate=0.2"]


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    results = _run_two_ranks(tmp_path, RANKS_OVERRIDES + ["trainer.max_nonfinite=2", "trainer.epochs=1"], nan_on_rank=1)
    for result in results:
        assert "non-finite" in result["outcome"] and "for 2 steps in a row" in result["outcome"], result
        assert "epoch 1, step 3" in result["outcome"], result  # steps 2 and 3 of rank 1, skipped by both ranks


def test_each_rank_resumes_its_own_rng_stream(tmp_path):
    first = _run_two_ranks(tmp_path, RANKS_OVERRIDES + ["trainer.epochs=1"])
    assert [r["outcome"] for r in first] == ["finished", "finished"] and all(not r["restored"] for r in first)
    saved = torch.load(next((tmp_path / "checkpoints").rglob("last.pt")), map_location="cpu", weights_only=True)
    assert not torch.equal(saved["rng_ranks"][0]["torch"], saved["rng_ranks"][1]["torch"])
    resumed = _run_two_ranks(tmp_path, RANKS_OVERRIDES + ["trainer.epochs=2", "resume=auto"])
    for rank, result in enumerate(resumed):
        assert result["outcome"] == "finished"
        assert result["restored"] == [saved["rng_ranks"][rank]["torch"].tolist()], f"rank {rank} restored another stream"

"""Nothing written where it should not be (issue 21): the clean-up of unfinished writes removes only this
module's own stale temporary files, metrics.jsonl never follows a planted link, a checkpoint that would inflate
is refused before inflating, checkpoints follow the umask, and a full disk (torch's RuntimeError) keeps the
last good checkpoint; a full disk is a failure, named as such, and summary.json names only an epoch a file holds
(issue 28)."""
from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fixedcls.runs import checkpoints as ckpt
from fixedcls.errors import CheckpointWriteError, FixedclsError
from fixedcls.tracking.run_files import MetricsFile


def state(marker: float, epoch: int = 1) -> dict:
    return {"model": {"w": torch.full((4, 4), marker)}, "epoch": epoch, "step_in_epoch": 0, "marker": marker}


def temp_name(target: str, host: str, pid: int) -> str:
    return f".{target}.{host}.{pid}.abc123{ckpt.TEMP_SUFFIX}"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_clean_up_removes_only_stale_temporary_files_of_checkpoint_writes(tmp_path):
    host = ckpt._HOST
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "user": ".notes.tmp",  # a user's file: never ours
            "old style": ".last.pt.abcd1234.tmp",  # not this pattern either
            "live here": temp_name("last.pt", host, sleeper.pid),  # another run on this machine, mid-write
            "dead here": temp_name("epoch_0002.pt", host, dead_pid()),  # its writer is gone
            "other host, recent": temp_name("last.pt", "node-b", 12345),  # maybe alive there
            "other host, stale": temp_name("best.pt", "node-b", 12345),
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        stale = time.time() - ckpt.STALE_SECONDS - 60
        os.utime(tmp_path / names["other host, stale"], (stale, stale))
        ckpt.CheckpointWriter(tmp_path)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names[k] for k in ("user", "old style", "live here", "other host, recent")}
    finally:
        sleeper.kill()
        sleeper.wait()
    ckpt.remove_partial_writes(tmp_path)  # its writer ended now
    assert names["live here"] not in {p.name for p in tmp_path.iterdir()}


def test_the_names_written_are_the_names_cleaned_up(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), real_replace(src, dst)))
    writer = ckpt.CheckpointWriter(tmp_path)
    writer.save_epoch(state(1.0), {"test/acc": 0.5})
    assert len(seen) == 3  # epoch file, last.pt, best.pt
    for name in seen:
        found = ckpt.PARTIAL.match(name)
        assert found and found.group("host") == ckpt._HOST and int(found.group("pid")) == os.getpid(), name


def test_metrics_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to(victim)
    with pytest.warns(UserWarning, match="symbolic link, not followed"):
        MetricsFile(run_dir).append({"epoch": 1, "train/loss": 0.5})
    assert victim.read_text() == "precious\n"
    (run_dir / "metrics.jsonl").unlink()
    MetricsFile(run_dir).append({"epoch": 1})
    assert (run_dir / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_a_checkpoint_that_would_inflate_is_refused_before_inflating(tmp_path):
    buffer = io.BytesIO()
    torch.save(state(1.0), buffer)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as real, zipfile.ZipFile(bomb, "w") as out:
        for record in real.infolist():
            out.writestr(record.filename, real.read(record), compress_type=zipfile.ZIP_DEFLATED)
        out.writestr("archive/data/99", bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 200_000
    started = time.perf_counter()
    with pytest.raises(FixedclsError, match="compressed records .* torch.save never writes"):
        ckpt.load(bomb)
    assert time.perf_counter() - started < 0.05  # refused from the directory, nothing inflated

    # Stored records whose central directory claims more bytes than the file has.
    liar = tmp_path / "liar.pt"
    ckpt.atomic_save(state(1.0), liar)
    data = bytearray(liar.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central-directory record: its uncompressed size at +24
    data[entry + 24: entry + 28] = (1 << 31).to_bytes(4, "little")
    liar.write_bytes(bytes(data))
    with pytest.raises(FixedclsError, match="claims .* bytes of records in a file of"):
        ckpt.load(liar)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        writer = ckpt.CheckpointWriter(tmp_path)
        writer.save_epoch(state(1.0), {"test/acc": 0.5})
    finally:
        os.umask(previous)
    for name in ("epoch_0001.pt", "last.pt", "best.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("background", [False, True])
def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, caplog, background):
    writer = ckpt.CheckpointWriter(tmp_path, background=background)
    writer.save_epoch(state(1.0, epoch=1), {"test/acc": 0.5})
    writer.wait()

    def full_disk(*args, **kwargs):  # what torch's zip writer raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed. No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with caplog.at_level(logging.WARNING, logger="fixedcls"):
        writer.save_epoch(state(2.0, epoch=2), {"test/acc": 0.9})
        writer.wait()
        writer.close()
    assert "the disk is full: could not write checkpoint epoch_0002.pt" in caplog.text and str(tmp_path) in caplog.text
    assert "still hold the last good checkpoints" in caplog.text and "exit status 1" in caplog.text
    assert writer.failed_epochs == {2} and writer.best_epoch == 1 and "epoch(s) 2 have no checkpoint" in writer.failure()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]  # no debris
    assert ckpt.load(tmp_path / "last.pt")["marker"] == 1.0
    with pytest.raises(OSError) as raised:
        ckpt.atomic_save(state(3.0), tmp_path / "last.pt")
    assert raised.value.errno == 28  # ENOSPC, so a command reports it as a runtime failure (exit 1)


@pytest.mark.parametrize("free,errno_", [(0, 28), (10 * 2**30, 5)])
def test_torchs_short_write_is_a_full_disk_when_the_disk_is_full(tmp_path, monkeypatch, free, errno_):
    """On a full disk torch's zip writer only says `unexpected pos` (measured on a 1 MiB tmpfs): the disk is asked."""
    import shutil
    from types import SimpleNamespace

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30 - free, free=free))
    with pytest.raises(OSError) as raised:
        ckpt.atomic_save(state(1.0), tmp_path / "epoch_0001.pt")
    assert raised.value.errno == errno_ and "unexpected pos" in raised.value.strerror
    assert ckpt.disk_full(raised.value) == (errno_ == 28) and not list(tmp_path.iterdir())


def fill_the_disk(monkeypatch, failing) -> None:
    """torch.save fails as on a full disk at the calls (counted from 1) for which `failing(call)` is true."""
    import errno

    real, calls = torch.save, [0]

    def save(*args, **kwargs):
        calls[0] += 1
        if failing(calls[0]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


FAST = ["collapse.every=0", "collapse.plot=false"]


def test_a_run_whose_last_checkpoint_hit_a_full_disk_fails_and_its_summary_names_a_file(tmp_path, monkeypatch, caplog):
    import json

    from utils import train_tiny

    # lr shrinks every epoch under the cosine schedule: with best_mode=min the last epoch is always the best
    fill_the_disk(monkeypatch, lambda call: call == 3)
    with caplog.at_level(logging.WARNING, logger="fixedcls"), pytest.raises(CheckpointWriteError) as failed:
        train_tiny(tmp_path, FAST + ["trainer.epochs=3", "checkpoint.best_metric=lr", "checkpoint.best_mode=min"])
    assert failed.value.exit_code == 1 and "the disk is full" in str(failed.value)
    summary = failed.value.summary
    folder = Path(summary["checkpoint_dir"])
    assert summary["epochs"] == 3 and summary["best/epoch"] == 2  # not 3: no file holds epoch 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best/epoch"] == 2
    assert ckpt.load(folder / "best.pt")["epoch"] == 2 and ckpt.load(folder / "last.pt")["epoch"] == 2
    assert f"the disk is full: could not write checkpoint epoch_0003.pt to {folder}" in caplog.text


@pytest.mark.parametrize("background", ["true", "false"])
def test_two_failed_writes_in_a_row_stop_the_run_at_once(tmp_path, monkeypatch, background):
    from utils import train_tiny

    fill_the_disk(monkeypatch, lambda call: call >= 2)
    with pytest.raises(CheckpointWriteError, match=r"the disk is full: .*2 writes in a row: stopped") as failed:
        train_tiny(tmp_path, FAST + ["trainer.epochs=5", f"checkpoint.background={background}"])
    summary = failed.value.summary
    assert summary["epochs"] == 3 and summary["best/epoch"] == 1  # epoch 2's and 3's writes failed: stopped
    assert ckpt.load(Path(summary["checkpoint_dir"]) / "best.pt")["epoch"] == 1


def test_the_cli_says_the_disk_is_full_in_one_line_and_exits_1(tmp_path):
    import json

    from test_errors import TINY, assert_one_line_error
    from test_resume import run_cli

    prelude = ("import errno, os, torch\n_save, _calls = torch.save, [0]\n"
               "def _full_after_one(*args, **kwargs):\n"
               "    _calls[0] += 1\n"
               "    if _calls[0] > 1:\n"
               "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
               "    return _save(*args, **kwargs)\n"
               "torch.save = _full_after_one\n")
    result = run_cli(TINY + ["trainer.epochs=4", "hydra.run.dir=run", "hydra/job_logging=disabled"], tmp_path,
                     prelude=prelude, timeout=120)
    assert_one_line_error(result, "the disk is full", "checkpoints", "2 writes in a row", "resume=auto", code=1)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["best/epoch"] == 1

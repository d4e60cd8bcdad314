"""Run identity: which experiment a config describes, whatever its bookkeeping.

Two configs with the same identity train the same model on the same data the same way, so a checkpoint of
one may continue the other (`resume`). The identity is a hash of the resolved config without the keys of
`IDENTITY_EXCLUDES`: paths, loggers, the run name, display and speed settings, the epoch count (extending
a run is allowed) and the generations section (fixedcls-compat sets each generation's own keys).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

#: Keys (or whole sections, ending in ".") left out of a run's identity, with the reason for each group.
IDENTITY_EXCLUDES: tuple[str, ...] = (
    # names and paths: the same experiment under another name, folder or resume mode
    "name", "resume", "experiment", "checkpoint.root", "checkpoint.dir", "checkpoint.keep", "checkpoint.every", "checkpoint.background",
    "data.root", "data.download",
    # where and how fast it runs, not what it computes (exact resume with other worker counts is tested)
    "trainer.progress", "trainer.threads", "trainer.device", "trainer.compile", "trainer.channels_last",
    "data.num_workers", "data.eval_batch_size", "collapse.cache_mb",
    # extending a run to more epochs continues the same experiment
    "trainer.epochs",
    # what is reported, not trained (the OOD pass of collapse.ood restores every random stream it draws from)
    "logger.", "collapse.plot", "collapse.thresholds.", "collapse.ood",
    # read by fixedcls-compat train only, which sets every generation's own data.classes, model.*, seed
    "generations.",
)


#: Keys added after run identities began, each with the value at which it trains exactly as before it existed.
#: At that value a key is left out of the identity, so a run begun by an older fixedcls keeps its identity and
#: `resume=auto` still finds its folder (tests/test_old_checkpoints.py). A new key joins with its default.
ADDED_KEYS: dict[str, Any] = {
    # dot regression as Yang et al.'s code trains it (issue 31); on the L2-normalised features that
    # loss=dot_regression needed before, dr_length=feature is the loss the fixed length gave
    "trainer.dr_length": "feature", "trainer.dr_reg": 0.0, "trainer.dr_balance": "none",
    "sched.decay_milestones": None,
    # HOC, BCT and the old model; model replacement (fixedcls-compat train)
    "trainer.hoc_mu": 10.0, "trainer.hoc_lambda": 0.1, "trainer.bct_weight": 0.0, "trainer.old_model": None,
    "generations.replace": [], "generations.replace_with": [], "generations.replace_old_model": "previous",
}


def flatten(config: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"optim.lr": 0.1, ...}: every leaf of a nested config under its dotted key (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def is_excluded(key: str, keep: tuple[str, ...] = ()) -> bool:
    excludes = [ex for ex in IDENTITY_EXCLUDES if ex not in keep]
    return any(key == ex or (ex.endswith(".") and key.startswith(ex)) for ex in excludes)


def covered_items(resolved_config: Mapping, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys and values a run's identity covers (`keep`: entries of IDENTITY_EXCLUDES to cover after all)."""
    return {k: v for k, v in sorted(flatten(resolved_config).items())
            if not is_excluded(k, keep) and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}


def run_identity(resolved_config: Mapping, keep: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """(sha256 hex of the covered keys and values, the covered keys) of a resolved plain config.
    `keep=("generations.",)`: the identity of a whole `fixedcls-compat train` sequence."""
    covered = covered_items(resolved_config, keep)
    text = json.dumps(covered, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), list(covered)


def differences(stored: Mapping, current: Mapping) -> list[tuple[str, Any, Any]]:
    """(key, value in `stored`, value in `current`) for every covered key whose values differ. Both configs
    are resolved plain dicts on the same schema (a stored one merged onto it, so old checkpoints compare
    their keys and take today's defaults for keys they predate)."""
    old, new = covered_items(stored), covered_items(current)
    missing = object()
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            found.append((key, None if a is missing else a, None if b is missing else b))
    return found


def describe_differences(found: list[tuple[str, Any, Any]]) -> str:
    """`optim.lr: 0.1 in the checkpoint, 0.3 now; seed: 0 in the checkpoint, 1 now`."""
    return "; ".join(f"{key}: {_show(a)} in the checkpoint, {_show(b)} now" for key, a, b in found)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


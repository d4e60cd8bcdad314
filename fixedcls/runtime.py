"""The process a run lives in: its device, its precision, its random streams, and the model inside wrappers.

One table of precisions and one unwrap, used by the loop, the measures and the commands alike.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .errors import FixedclsError

#: Precision name -> autocast dtype (None: no autocast).  The aliases are what users and torch call them.
AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}
_ALIASES = {"float32": "fp32", "32": "fp32", "bfloat16": "bf16", "float16": "fp16", "16": "fp16"}


def choice(value: Any) -> str:
    """The string of a config choice, whether OmegaConf gives the Enum member or its value."""
    return value.value if hasattr(value, "value") else str(value)


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device; `key` names the setting in the error (a config key or a flag)."""
    name = choice(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FixedclsError(f"unknown {key}={name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FixedclsError(f"{key}={name} but no CUDA device is visible: use {key}=cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise FixedclsError(f"unsupported {key}={name!r}: use auto, cpu, cuda or cuda:N")
    return device


def autocast_dtype_of(value) -> Optional[torch.dtype]:
    """The autocast dtype of a precision given as a name ('bf16', 'bfloat16', 'fp16', '16', ...) or a dtype."""
    if value is None or isinstance(value, torch.dtype):
        return None if value in (None, torch.float32) else value
    key = str(choice(value)).lower()
    key = _ALIASES.get(key, key)
    if key not in AUTOCAST_DTYPES:
        raise FixedclsError(f"unknown precision {value!r}: choose one of {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[key]


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast context of a precision name; fp16 is refused on CPU, where it is slow and unscaled."""
    precision = choice(precision)
    if precision not in AUTOCAST_DTYPES:
        raise FixedclsError(f"unknown trainer.precision='{precision}': choose one of {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise FixedclsError("trainer.precision=fp16 needs a CUDA device (gradient scaling); on CPU use bf16 or fp32")
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Classifier inside DDP, torch.compile and EMA wrappers."""
    for _ in range(8):
        if hasattr(model, "head"):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random stream of this process, as tensors and plain containers (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def split_rng(rank: int) -> None:
    """Give every rank > 0 a torch RNG stream of its own (dropout, drop-path and other random layers).

    Every rank seeds alike so the models start equal; without this each rank would then draw the same
    dropout masks.  Rank 0 keeps its stream, so a one-process run is unchanged.
    """
    if rank > 0:
        torch.manual_seed((torch.initial_seed() + 1_000_003 * rank) % 2**63)


def choose_threads(requested: Optional[int], resumed: Optional[int]) -> tuple[int, str]:
    """The intra-op thread count of a run and why, set in torch.

    Never chosen from how busy the machine is: torch's CPU results change with the thread count, so a count
    picked from the load would make two runs of one command differ.  A resumed run keeps the count its
    checkpoint was trained with, so it stays bit-exact; `trainer.threads` overrides both.
    """
    if requested:
        torch.set_num_threads(requested)
        return requested, "trainer.threads"
    if resumed:
        torch.set_num_threads(resumed)
        return resumed, "kept from the resumed checkpoint (trainer.threads overrides)"
    return torch.get_num_threads(), "torch's default, one per core (trainer.threads overrides)"


def openmp_waiting() -> str:
    """How torch's OpenMP threads wait at a barrier in this process, for the run's log line ('' if untouched)."""
    policy, spins = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    parts = ([f"OMP_WAIT_POLICY={policy}"] if policy else []) + ([f"GOMP_SPINCOUNT={spins}"] if spins else [])
    return f"; OpenMP waits with {', '.join(parts)}" if parts else ""

"""Shared test set-up: one CPU thread per test process (2-core CI machines), quiet plots, and the CPU only.

The suite asserts CPU behaviour (bit-exact resume, fp16 refused without CUDA, trainer.device=auto meaning the
CPU), so on a machine with a GPU it hides the GPU from every test and every process a test starts; the GPU
paths are checked by the benchmark (`python tools/bench.py --device cuda`), never by unit tests.
"""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

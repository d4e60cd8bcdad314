"""Export a trained model out of fixedcls: a plain timm model, a fixedcls folder, ONNX or TorchScript.

- `timm`: a fixed head without feature normalisation is one linear map of the backbone features,
  logits = s * (P f) W^T + b = f (s W P)^T + b (P the projection, W the prototypes), so it folds exactly into
  timm's own classifier `nn.Linear(width, K)`. The folder is timm's `save_for_hf` layout (`model.safetensors`,
  `config.json` with the evaluation preprocessing and the class names): `timm.create_model("local-dir:DIR",
  pretrained=True)` rebuilds it without fixedcls. A learned linear head folds the same way.
- `fixedcls`: the Classifier's weights (safetensors) and a JSON config that `fixedcls.load` reads; every head.
- `onnx` (torch's exporter, checked with onnxruntime) and `torchscript` (traced): the logits only.

Every export is written into a temporary sibling folder, checked against the PyTorch model's logits on a test
batch, and only then renamed into place: a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import errors_name
from ..errors import FixedclsError
from ..models.heads import CosineHead, FixedHead, LinearHead
from .loading import CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, WEIGHTS_FILE, LoadedModel

FORMATS = ("timm", "fixedcls", "onnx", "torchscript")
SIDECAR_FILE = "fixedcls.json"  # class names and preprocessing beside an ONNX / TorchScript file
INSTALL_EXPORT = 'pip install -e ".[export]"'  # the README's form of every install hint
RTOL = 1e-5  # exports must give the PyTorch logits to this relative precision (max |diff| / max |logit|)
ONNX_RTOL = 1e-4  # onnxruntime fuses and reorders float32 arithmetic: a little more room


def folded_classifier(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, width], bias [K]) of the one linear layer that equals projection + head, computed in float64;
    a head that normalises its input is no linear map and is refused in one line."""
    head = model.head
    fix = "export it with --format fixedcls (or onnx / torchscript), which keep the head as it is"
    if isinstance(head, CosineHead):
        raise FixedclsError(f"a cosine head normalises features and class vectors, so it does not fold into one "
                            f"nn.Linear of a plain timm model: {fix}")
    if isinstance(head, FixedHead) and head.normalize != "none":
        learned = ", with a learned scale," if isinstance(head.scale, nn.Parameter) else ""
        raise FixedclsError(f"a fixed head with head.normalize={head.normalize}{learned} L2-normalises its input, so it "
                            f"does not fold into one nn.Linear of a plain timm model: {fix}")
    if isinstance(head, FixedHead):
        weight = head.prototypes.double() * float(torch.as_tensor(head.scale).detach())
    elif isinstance(head, LinearHead):
        weight = head.weight.double()
    else:
        raise FixedclsError(f"head {type(head).__name__} has no known linear form: {fix}")
    if isinstance(model.proj, nn.Linear):
        weight = weight @ model.proj.weight.double()
    bias = head.bias.double() if head.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    return weight.detach().float(), bias.detach().float()


def timm_model(model: nn.Module) -> nn.Module:
    """A copy of the backbone with timm's own classifier carrying the folded projection + head."""
    import copy

    plain = copy.deepcopy(model.backbone).cpu().eval()
    weight, bias = folded_classifier(model)
    if not hasattr(plain, "reset_classifier"):
        raise FixedclsError(f"backbone {type(plain).__name__} has no timm classifier to fold the head into: "
                            f"export with --format fixedcls")
    plain.reset_classifier(weight.shape[0])
    classifier = plain.get_classifier()
    if not isinstance(classifier, nn.Linear) or tuple(classifier.weight.shape) != tuple(weight.shape):
        raise FixedclsError(f"backbone {type(plain).__name__}'s timm classifier is {type(classifier).__name__}, not an "
                            f"nn.Linear{tuple(weight.shape[::-1])} the head could fold into: export with --format fixedcls")
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(bias)
    return plain.eval()


def _timm_data_config(preprocessing: dict) -> dict:
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    return {key: tuple(preprocessing[key]) if isinstance(preprocessing[key], list) else preprocessing[key] for key in keys}


def write_timm(loaded: LoadedModel, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    from timm.models import save_for_hf

    plain = timm_model(loaded.model)
    save_for_hf(plain, str(folder), model_config={"label_names": list(loaded.class_names)}, safe_serialization=True,
                data_config=_timm_data_config(loaded.preprocessing))

    def reload(x: torch.Tensor) -> torch.Tensor:
        import timm

        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x)

    return reload


def write_fixedcls(loaded: LoadedModel, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    from safetensors.torch import save_file

    from .loading import load

    folder.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().cpu().contiguous() for key, value in loaded.model.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": EXPORT_FORMAT})
    config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": loaded.spec,
              "class_names": list(loaded.class_names), "preprocessing": loaded.preprocessing,
              "identity": loaded.identity, "config": loaded.config}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return lambda x: load(folder).model(x)


def _write_sidecar(loaded: LoadedModel, folder: Path, model_file: str) -> None:
    sidecar = {"model_file": model_file, "input": "float32 [B, " + ", ".join(map(str, loaded.preprocessing["input_size"])) + "]",
               "output": f"logits [B, {len(loaded.class_names)}]", "class_names": list(loaded.class_names),
               "preprocessing": loaded.preprocessing, "identity": loaded.identity}
    (folder / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")


def write_onnx(loaded: LoadedModel, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise FixedclsError(f"--format onnx needs onnx, onnxscript and onnxruntime: {INSTALL_EXPORT}") from None
    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *loaded.preprocessing["input_size"])
    model = loaded.model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress chatter, not problems
        try:
            torch.onnx.export(model, (example,), str(folder / "model.onnx"), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=True,
                              external_data=False, verbose=False)
        except ImportError:
            raise FixedclsError(f"--format onnx needs onnx and onnxscript: {INSTALL_EXPORT}") from None
    _write_sidecar(loaded, folder, "model.onnx")

    def run(x: torch.Tensor) -> torch.Tensor:
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])

    return run


def write_torchscript(loaded: LoadedModel, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import warnings

    folder.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *loaded.preprocessing["input_size"])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        traced = torch.jit.trace(loaded.model.cpu().eval(), (example,), check_trace=False)
        torch.jit.save(traced, str(folder / "model.pt"))
    _write_sidecar(loaded, folder, "model.pt")

    def run(x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(folder / "model.pt"), map_location="cpu")(x)

    return run


WRITERS = {"timm": write_timm, "fixedcls": write_fixedcls, "onnx": write_onnx, "torchscript": write_torchscript}


def export(loaded: LoadedModel, out: str | Path, fmt: str = "timm", *, force: bool = False, batch: int = 3) -> dict:
    """Write `loaded` to the folder `out` in format `fmt`, check the export's logits against the model's on a
    seeded test batch, then move it into place. Returns {"format", "out", "max_abs_diff", "rel_diff"}."""
    if fmt not in WRITERS:
        raise FixedclsError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise FixedclsError(f"{out} already exists: choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise FixedclsError(f"{out} is a file: give a folder for --out")
    with errors_name(out):
        return _export_through_staging(loaded, out, fmt, batch)


def _export_through_staging(loaded: LoadedModel, out: Path, fmt: str, batch: int) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        model = loaded.model.cpu().eval()
        exported = WRITERS[fmt](loaded, staging / "export")
        example = torch.randn(batch, *loaded.preprocessing["input_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = model(example).float()
            got = exported(example).float()
        if got.shape != expected.shape:
            raise FixedclsError(f"the {fmt} export gives logits of shape {list(got.shape)}, not {list(expected.shape)}: "
                                f"nothing was written (export with --format fixedcls)")
        diff = float((got - expected).abs().max())
        rel = diff / max(float(expected.abs().max()), 1e-12)
        tolerance = ONNX_RTOL if fmt == "onnx" else RTOL
        if not rel <= tolerance:
            raise FixedclsError(f"the {fmt} export's logits differ from the model's by {rel:.2e} (relative, over the "
                                f"{tolerance:.0e} allowed): nothing was written; use --format fixedcls")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging / "export", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"format": fmt, "out": str(out), "max_abs_diff": diff, "rel_diff": rel}

"""Using a trained model without its training data: `load` a checkpoint (or an exported folder) in one line,
turn image files into inputs exactly as the evaluation views of training do, and name the outputs.

    import fixedcls
    trained = fixedcls.load("checkpoints/digits-resnet18-simplex-s0")
    logits = trained.model(trained.transform(image).unsqueeze(0))      # image: a PIL image
    print(trained.class_names[int(logits.argmax())])

A checkpoint written since the `inference` entry exists carries class names, preprocessing and the model spec
(docs/checkpoints.md); an older one falls back to what its stored config can rebuild.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..data.datasets import IMAGE_EXTENSIONS
from ..data.transforms import eval_transform, file_normalization, preprocessing_spec
from ..errors import FixedclsError
from ..models import classifier
from ..runs import rebuild

log = logging.getLogger("fixedcls")
EXPORT_FORMAT = "fixedcls-export"  # the marker of a folder written by `fixedcls-export --format fixedcls`
EXPORT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


class ImageTransform:
    """PIL image -> model input: convert to the training image mode, then timm's evaluation transform.

    A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, preprocessing: dict):
        self.preprocessing = dict(preprocessing)
        self.mode = preprocessing.get("image_mode")
        self.tensor_transform = eval_transform(preprocessing)

    def __call__(self, image) -> torch.Tensor:
        if self.mode is None:
            channels = self.preprocessing["input_size"][0]
            raise FixedclsError(f"this model takes {channels}-channel inputs, which no image file holds: feed it "
                                f"tensors of shape {self.preprocessing['input_size']} instead of images")
        return self.tensor_transform(image.convert(self.mode))

    def __repr__(self) -> str:
        return f"ImageTransform(mode={self.mode!r}, {self.tensor_transform})"


@dataclass
class LoadedModel:
    """A trained model ready to use: `model(batch)` returns logits; `transform(pil_image)` an input tensor."""

    model: nn.Module
    transform: ImageTransform
    class_names: list[str]
    config: Optional[dict]  # the training run's resolved config (plain containers)
    preprocessing: dict
    spec: dict  # the keywords that rebuild the model (classifier.model_from_spec)
    identity: dict = field(default_factory=dict)  # which model this is: checkpoint, epoch, meta, prototype hash
    path: Optional[Path] = None

    def top_classes(self, logits: torch.Tensor, topk: int = 5) -> list[list[tuple[str, float]]]:
        """The `topk` (class name, probability) pairs of each row of a logits batch."""
        probabilities = logits.detach().float().softmax(1).cpu()
        values, indices = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
        return [[(self.class_names[i], v) for v, i in zip(vs, ids)] for vs, ids in zip(values.tolist(), indices.tolist())]

    def predict(self, images: Iterable, topk: int = 5) -> list[list[tuple[str, float]]]:
        """The `topk` (class name, probability) pairs of each PIL image."""
        batch = torch.stack([self.transform(image) for image in images])
        with torch.no_grad():
            return self.top_classes(self.model(batch.to(next(self.model.parameters()).device)), topk)


def load(path: str | Path, device: str | torch.device = "cpu", ema: bool = False) -> LoadedModel:
    """A trained model from a checkpoint file, a run's checkpoint folder (its newest good checkpoint) or a folder
    written by `fixedcls-export --format fixedcls`; in eval mode on `device`. `ema=True` takes the EMA weights.
    Never reads the training data."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        loaded = _load_export(path, ema)
    else:
        loaded = _load_checkpoint(path, ema)
    loaded.model.to(device).eval()
    return loaded


def _load_checkpoint(path: Path, ema: bool) -> LoadedModel:
    file, state = rebuild.load_checkpoint(path)
    config = state.get("config")
    stored = state.get("inference")
    if isinstance(stored, dict) and stored.get("model"):
        spec = dict(stored["model"])
        model = classifier.model_from_spec(spec)
        preprocessing, class_names = stored["preprocessing"], list(stored["class_names"])
    else:  # written before checkpoints carried `inference`: rebuild from the stored config
        model, cfg, _, _ = rebuild.model_from_checkpoint(file)
        spec = {**classifier.model_spec(cfg, num_classes=model.num_classes, in_chans=classifier.in_chans_of(cfg),
                                   img_size=cfg.data.img_size), "dim": int(model.dim)}
        preprocessing, class_names = _rebuilt_preprocessing(cfg, file)
    weights = state["model"]
    if ema:
        if not state.get("ema"):
            raise FixedclsError(f"checkpoint {file} holds no EMA weights (it was trained with trainer.ema=false): drop --ema / ema=True")
        weights = {key.removeprefix("module."): value for key, value in state["ema"].items()}
    _load_weights(model, weights, file)
    identity = {**model_identity(model, file, state), "ema": bool(ema)}
    return LoadedModel(model=model.eval(), transform=ImageTransform(preprocessing),
                       class_names=_output_names(class_names, model), config=config, preprocessing=preprocessing,
                       spec=spec, identity=identity, path=file)


def _rebuilt_preprocessing(cfg, file: Path) -> tuple[dict, list[str]]:
    """(preprocessing, class names) of an old checkpoint, from its config: digits and synthetic data are rebuilt
    (they need no files); CIFAR and image folders take the config's mean/std and, when the folder is still
    there, its class folder names."""
    from ..data.datasets import create_data

    data = cfg.data
    if data.name in ("digits", "synthetic"):
        bundle = create_data(data)
        return bundle.preprocessing, list(bundle.class_names)
    in_chans = classifier.in_chans_of(cfg)
    mean, std = file_normalization(data, in_chans)
    preprocessing = preprocessing_spec(in_chans=in_chans, img_size=data.img_size, mean=mean, std=std)
    names: list[str] = []
    folder = Path(str(data.root or "")).expanduser() / str(data.train_split)
    if data.name == "imagefolder" and folder.is_dir():
        names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        log.warning(f"warning: checkpoint {file} predates stored class names and its data is not here: "
                    f"classes are named by their index")
    return preprocessing, names


def _output_names(class_names: list[str], model: nn.Module) -> list[str]:
    """One name per head output: reserved prototypes (outputs beyond the data's classes) get a name too."""
    names = [str(name) for name in class_names][: model.num_classes]
    return names + [str(i) if not class_names else f"reserved_{i}" for i in range(len(names), model.num_classes)]


def _load_weights(model: nn.Module, weights: dict, source: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise FixedclsError(f"{source} does not match the model it describes ({rebuild.mismatch(model, weights)}): "
                            f"it was written by another fixedcls version") from None


def model_identity(model: nn.Module, source: Path, state: Optional[dict] = None) -> dict:
    """Which model this is, as plain values: where it came from, its epoch and meta, and a hash of its fixed
    prototypes (two generations share a feature space only if these agree)."""
    state = state or {}
    identity = {"source": str(source), "epoch": int(state.get("epoch", 0)), **dict(state.get("meta") or {})}
    prototypes = getattr(model.head, "prototypes", None)
    if prototypes is not None:
        identity["prototypes_sha256"] = hashlib.sha256(prototypes.detach().float().cpu().numpy().tobytes()).hexdigest()
    return {key: value for key, value in identity.items() if isinstance(value, (str, int, float, bool, type(None)))}


def read_export_config(folder: Path) -> dict:
    """The config.json of an exported folder, checked to be a fixedcls export."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise FixedclsError(f"{folder / CONFIG_FILE} cannot be read ({error}): export the model again") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        if isinstance(config, dict) and "architecture" in config:
            raise FixedclsError(f"{folder} is a plain timm export: load it with timm.create_model('local-dir:{folder}', "
                                f"pretrained=True), or export with --format fixedcls for fixedcls.load")
        raise FixedclsError(f"{folder} holds a config.json that fixedcls did not write: pass a checkpoint, a checkpoint "
                            f"folder or a folder written by fixedcls-export --format fixedcls")
    if int(config.get("version", 0)) > EXPORT_VERSION:
        raise FixedclsError(f"{folder} was exported by a newer fixedcls (format version {config['version']}): update fixedcls")
    return config


def _load_export(folder: Path, ema: bool) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_export_config(folder)
    if ema and not config.get("identity", {}).get("ema"):
        raise FixedclsError(f"{folder} holds the plain weights, not the EMA ones: export with --ema, or load without ema")
    model = classifier.model_from_spec(config["model"])
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except (OSError, SafetensorError) as error:
        raise FixedclsError(f"{folder / WEIGHTS_FILE} cannot be read ({error}): export the model again") from None
    _load_weights(model, weights, folder)
    return LoadedModel(model=model.eval(), transform=ImageTransform(config["preprocessing"]),
                       class_names=_output_names(config["class_names"], model), config=config.get("config"),
                       preprocessing=config["preprocessing"], spec=config["model"],
                       identity=dict(config.get("identity") or {}), path=folder)


# --------------------------------------------------------------------------- image files


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named, or found (recursively, by extension) in folders named, in a stable order."""
    found: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise FixedclsError(f"{path} does not exist: give image files or folders of images")
    return found


def read_image(path: Path, mode: Optional[str] = None):
    """A decoded PIL image (converted to `mode`), or a one-line FixedclsError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except Exception as error:  # PIL raises many types for a file that is not an image
        raise FixedclsError(f"cannot read image {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files through a model's transform; an unreadable file yields None (the collate drops it)."""

    def __init__(self, files: list[Path], transform: ImageTransform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(read_image(self.files[index]))
        except FixedclsError as error:
            return index, str(error)


def image_batches(files: list[Path], transform: ImageTransform, batch_size: int, on_error: Callable[[Path, str], None]):
    """(files, input batch) pairs of the readable images; each unreadable one goes to `on_error` and is skipped."""
    loader = torch.utils.data.DataLoader(ImageFileDataset(files, transform), batch_size=batch_size,
                                         collate_fn=list, shuffle=False)
    for items in loader:
        good = []
        for index, value in items:
            if isinstance(value, str):
                on_error(files[index], value)
            else:
                good.append((files[index], value))
        if good:
            yield [path for path, _ in good], torch.stack([tensor for _, tensor in good])

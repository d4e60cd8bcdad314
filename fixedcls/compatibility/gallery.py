"""A stored retrieval gallery (the CoReS use case: a new model generation searches the gallery an old one
indexed, which is never re-indexed).

A gallery file is one safetensors file: `features` (float32 [N, d], L2-normalised head inputs), `labels`
(int64 [N], -1 when unknown) and, in its metadata, the sample paths, the class names and the identity of the
model that embedded it. `fixedcls-embed` writes one; `fixedcls-compat --gallery FILE` searches it.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..atomic import errors_name, file_mode
from ..errors import FixedclsError

GALLERY_FORMAT = "fixedcls-gallery"
GALLERY_VERSION = 1


@dataclass
class Gallery:
    features: torch.Tensor  # [N, d] float32, unit rows
    labels: torch.Tensor  # [N] int64
    paths: list[str]
    class_names: list[str] = field(default_factory=list)
    identity: dict = field(default_factory=dict)  # the embedding model (fixedcls.inference.model_identity)
    source: str = ""  # what was embedded: a split name or "files"


def save_gallery(gallery: Gallery, path: str | Path) -> Path:
    """Write `gallery` to `path` (a temporary file renamed into place: never half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    if len(gallery.paths) != len(gallery.features) or len(gallery.labels) != len(gallery.features):
        raise ValueError("a gallery needs one path and one label per feature row")
    metadata = {"format": GALLERY_FORMAT, "version": str(GALLERY_VERSION), "source": gallery.source,
                "paths": json.dumps(gallery.paths), "class_names": json.dumps(list(gallery.class_names)),
                "identity": json.dumps(gallery.identity)}
    with errors_name(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        try:
            save_file({"features": gallery.features.float().contiguous(), "labels": gallery.labels.long().contiguous()},
                      partial, metadata=metadata)
            os.chmod(partial, file_mode())
            os.replace(partial, path)
        finally:
            Path(partial).unlink(missing_ok=True)
    return path


def load_gallery(path: str | Path) -> Gallery:
    """A gallery file written by `save_gallery`; anything else is a one-line FixedclsError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FixedclsError(f"gallery file {path} does not exist: write one with fixedcls-embed CKPT --out {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != GALLERY_FORMAT:
                raise FixedclsError(f"{path} is not a gallery written by fixedcls-embed: write one with fixedcls-embed CKPT --out FILE")
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
    except (SafetensorError, OSError, ValueError) as error:
        raise FixedclsError(f"gallery file {path} cannot be read ({str(error).splitlines()[0]}): write it again with fixedcls-embed") from None
    if int(metadata.get("version", "0")) > GALLERY_VERSION:
        raise FixedclsError(f"gallery {path} was written by a newer fixedcls (version {metadata['version']}): update fixedcls")
    return Gallery(features=features, labels=labels, paths=json.loads(metadata.get("paths", "[]")),
                   class_names=json.loads(metadata.get("class_names", "[]")),
                   identity=json.loads(metadata.get("identity", "{}")), source=metadata.get("source", ""))


def sample_paths(dataset, split: str) -> list[str]:
    """Where each sample of a dataset comes from: the image file when there is one, else "<split>:<index>"."""
    from ..data.datasets import ImageFiles, LabelSubset

    if isinstance(dataset, LabelSubset):
        parent = sample_paths(dataset.dataset, split)
        return [parent[i] for i in dataset.indices]
    if isinstance(dataset, ImageFiles):
        return [str(p) for p, _ in dataset.dataset.reader.samples]
    return [f"{split}:{i}" for i in range(len(dataset))]


def labels_from_folders(files: list[Path], class_names: list[str]) -> torch.Tensor:
    """The label of each image file whose parent folder is named after a class (image-folder layout), else -1."""
    index = {str(name): i for i, name in enumerate(class_names)}
    return torch.tensor([index.get(path.parent.name, -1) for path in files], dtype=torch.long)


def same_feature_space(a: dict, b: dict) -> Optional[bool]:
    """Whether two model identities share fixed prototypes (None when either has none)."""
    if "prototypes_sha256" not in a or "prototypes_sha256" not in b:
        return None
    return a["prototypes_sha256"] == b["prototypes_sha256"]

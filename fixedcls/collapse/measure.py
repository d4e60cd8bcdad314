"""Measuring a model over a loader: the two exact passes of :class:`CollapseAccumulator` over a
``fixedcls`` model's features, on a fixed seeded subset or at backbone stages ("deep collapse"), and the
per-class alignment of class means with the classifier rows.

The two statistics passes need one forward pass only: :class:`FeatureCache` keeps the features of the
first while they fit a memory budget, and the second pass reads them back (above the budget the model
runs over the loader twice, as it must without the features)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..errors import FixedclsError
from ..runtime import autocast_dtype_of, rng_state, set_rng_state, unwrap
from .minority import minority_collapse
from .exact import CollapseAccumulator
from .stats import NC1_KEYS, ReduceFn, ood_sums


def _subset_loader(loader, max_samples: int, seed: int):
    """A new DataLoader over a fixed seeded subset of at most ``max_samples`` samples."""
    from torch.utils.data import DataLoader, Subset
    from torch.utils.data.distributed import DistributedSampler

    dataset = loader.dataset
    try:
        n = len(dataset)
    except TypeError as exc:
        raise FixedclsError("measure_model: max_samples needs a map-style dataset with len(); pass max_samples=None.") from exc
    if max_samples < 1:
        raise FixedclsError(f"measure_model: max_samples must be >= 1, got {max_samples}; pass None to measure every sample.")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[: min(int(max_samples), n)].sort().values.tolist()
    subset = Subset(dataset, idx)
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 256
    sampler = None
    # A sharded loader (DistributedSampler, fixedcls.loaders.EpochSampler) gets disjoint, unpadded shards of the
    # subset, so the all-reduced measures count every sample exactly once (DistributedSampler would pad).
    shard = loader.sampler
    world_size = getattr(shard, "num_replicas", None) or getattr(shard, "world_size", None) or 1
    if isinstance(shard, DistributedSampler) or world_size > 1:
        sampler = list(range(int(shard.rank), len(subset), int(world_size)))
    kwargs = {}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
        kwargs["multiprocessing_context"] = loader.multiprocessing_context
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        worker_init_fn=loader.worker_init_fn,
        **kwargs,
    )


def _pool(f: torch.Tensor) -> torch.Tensor:
    """Global average pool an intermediate: [B,C,H,W] -> [B,C]; [B,N,C] (tokens) -> [B,C]."""
    if f.dim() == 4:
        return f.mean(dim=(2, 3))
    if f.dim() == 3:
        return f.mean(dim=1)
    if f.dim() == 2:
        return f
    raise FixedclsError(f"measure_model: cannot pool an intermediate of shape {tuple(f.shape)}; deep collapse supports [B,C,H,W], [B,N,C] and [B,C].")


class _Intermediates:
    """Pooled backbone stage outputs via timm's ``forward_intermediates``."""

    def __init__(self, backbone: torch.nn.Module, layers):
        if not callable(getattr(backbone, "forward_intermediates", None)):
            raise FixedclsError(
                f"measure_model: backbone {type(backbone).__name__} has no forward_intermediates(); "
                "deep collapse (layers=...) needs a timm model that supports it, or pass layers=None."
            )
        self.backbone = backbone
        if isinstance(layers, str):
            if layers != "all":
                raise FixedclsError(f"measure_model: layers must be a list of stage indices or 'all', got {layers!r}.")
            self.requested = None
        else:
            if isinstance(layers, int):
                layers = [layers]
            self.requested = [int(i) for i in layers]
            if not self.requested:
                raise FixedclsError("measure_model: layers is empty; pass stage indices, 'all' or None.")
        self.keys: list[int] | None = None  # absolute stage index of each returned intermediate
        self._indices = None

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.keys is None:  # resolve indices on the first batch
            probe = self._call(x[:1], None)
            total = len(probe)
            if self.requested is None:
                self.keys = list(range(total))
            else:
                absolute = sorted({i + total if i < 0 else i for i in self.requested})
                bad = [i for i in absolute if not 0 <= i < total]
                if bad:
                    raise FixedclsError(
                        f"measure_model: layers {self.requested} out of range for a backbone with {total} stages (0..{total - 1}); pick stage indices in that range."
                    )
                self.keys = absolute
                self._indices = absolute
        feats = self._call(x, self._indices)
        if len(feats) != len(self.keys):
            raise RuntimeError(f"measure_model: forward_intermediates returned {len(feats)} outputs for stages {self.keys}.")
        return [_pool(f) for f in feats]

    def _call(self, x, indices):
        try:
            return self.backbone.forward_intermediates(x, indices=indices, intermediates_only=True)
        except TypeError as exc:
            raise FixedclsError(
                f"measure_model: {type(self.backbone).__name__}.forward_intermediates does not accept "
                f"(indices=..., intermediates_only=True) ({exc}); pass layers=None."
            ) from exc


class FeatureCache:
    """The outputs of one forward pass over a split (features, labels, logits, pooled stage outputs), kept
    while they fit ``budget_mb`` megabytes, so the second statistics pass reads them instead of running
    the model again.

    The cached tensors are the very ones the first pass measured, batch by batch, so the second pass sees
    bit for bit what a second forward of the same weights gives on a deterministic device, and the
    float64 statistics and decisions are the same.  Past the budget the cache empties itself and reports
    ``complete = False``: the caller then runs the model over the loader again.  ``budget_mb=0`` never
    caches.  The tensors stay where the model put them (GPU memory on a GPU).
    """

    def __init__(self, budget_mb: float):
        if budget_mb is None or not budget_mb >= 0:
            raise FixedclsError(f"collapse: cache_mb must be >= 0 megabytes, got {budget_mb!r}; 0 turns the feature cache off.")
        self.budget_bytes = int(float(budget_mb) * 2**20)
        self.batches: list[tuple] = []
        self.nbytes = 0
        self.complete = self.budget_bytes > 0

    def add(self, h: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None, pooled: Sequence[torch.Tensor] = ()) -> None:
        if not self.complete:
            return
        entry = (h.detach(), y.detach(), None if logits is None else logits.detach(), [f.detach() for f in pooled])
        size = sum(t.numel() * t.element_size() for t in (entry[0], entry[1], entry[2], *entry[3]) if t is not None)
        if self.nbytes + size > self.budget_bytes:
            self.batches, self.nbytes, self.complete = [], 0, False  # over budget: free it all, stream again
            return
        self.batches.append(entry)
        self.nbytes += size


def _split_batch(batch):
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for kx, ky in (("image", "label"), ("input", "target"), ("x", "y")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    raise FixedclsError("measure_model: the loader must yield (inputs, labels, ...) tuples; wrap the dataset to return them.")


def measure_model(
    model: torch.nn.Module,
    loader,
    *,
    device: torch.device | str,
    autocast_dtype: torch.dtype | str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    layers: Sequence[int] | str | None = None,
    reduce_fn: ReduceFn | None = None,
    channels_last: bool = False,
    accumulator: CollapseAccumulator | None = None,
    cache: FeatureCache | None = None,
    cache_mb: float = 256.0,
    minority: Sequence[int] = (),
    majority: Sequence[int] = (),
    ood: torch.Tensor | None = None,
) -> dict[str, float]:
    """Exact collapse measures of ``model`` on the data of ``loader`` (two statistics passes, one forward
    pass while the features fit ``cache_mb``).

    Runs the model in eval mode under ``torch.no_grad`` (and autocast when
    ``autocast_dtype`` is given), using ``model(x, return_features=True) -> (logits, h)``;
    the classifier rows are ``model.head.weight`` / ``model.head.bias``.  The loader must
    yield the same samples in both passes: use one without random augmentation or
    ``drop_last`` (a warning is raised otherwise).

    ``max_samples``: measure on a fixed seeded subset of at most that many samples (a new
    DataLoader over ``Subset(loader.dataset, indices)``, same batch size / workers /
    collate_fn; sharded again when the loader uses a DistributedSampler).
    ``layers``: stage indices (negative allowed) or ``"all"``: adds ``layer{i}/nc1`` and
    ``layer{i}/nc1_trace`` for the globally average-pooled outputs of
    ``model.backbone.forward_intermediates``.
    ``reduce_fn``: in-place SUM all-reduce for DDP (every rank must get >= 1 batch).
    ``channels_last``: feed the inputs in channels_last memory format (as a channels_last model is trained).
    ``accumulator``: a :class:`CollapseAccumulator` whose pass 1 was already fed with this model's
    features of exactly this loader's samples (e.g. during the test evaluation of the training loop):
    then only pass 2 runs over the loader.  Not with ``max_samples`` or ``layers``.
    ``cache``: with ``accumulator``, the :class:`FeatureCache` filled by that same forward pass (features,
    labels, logits); when complete, pass 2 reads it and the model does not run at all.
    ``cache_mb``: the budget of the feature cache of pass 1 (N x (d + K) values plus the pooled stages);
    ``0`` streams the loader twice.  Both ways give the same bits.
    ``minority`` / ``majority``: class ids; when minority is given, adds the minority-collapse measures
    (:func:`fixedcls.collapse.minority.minority_collapse`) of the class means and the head rows.
    ``ood``: this process's sums of out-of-distribution features, [d + 1] as :func:`ood_feature_sums` gives
    them (all-reduced with pass 2 under ``reduce_fn``): adds ``nc5``.
    The train/eval state of every submodule is restored afterwards.
    """
    device = torch.device(device)
    amp = autocast_dtype_of(autocast_dtype)
    core = unwrap(model)
    head = getattr(core, "head", None)
    if head is None or getattr(head, "weight", None) is None:
        raise FixedclsError("measure_model: the model has no head.weight; pass a fixedcls Classifier (model.head.weight [K, d]).")
    weight = head.weight.detach()
    bias = getattr(head, "bias", None)
    bias = bias.detach() if bias is not None else None
    num_classes, dim = weight.shape
    inter = None
    if layers is not None:
        backbone = getattr(core, "backbone", None)
        if backbone is None:
            raise FixedclsError("measure_model: layers=... needs model.backbone (a timm model); pass layers=None.")
        inter = _Intermediates(backbone, layers)
    if max_samples is not None:
        loader = _subset_loader(loader, max_samples, seed)
    stages = (1, 2)
    if accumulator is not None:
        if max_samples is not None or layers is not None:
            raise FixedclsError("measure_model: accumulator= (pass 1 done elsewhere) cannot be combined with max_samples or layers; pass accumulator=None.")
        if (accumulator.num_classes, accumulator.dim) != (num_classes, dim):
            raise FixedclsError(f"measure_model: the accumulator is for {accumulator.num_classes} classes x {accumulator.dim} dims but the head is {num_classes} x {dim}; build it from model.head.weight.shape.")
        stages = (2,)
    elif cache is not None:
        raise FixedclsError("measure_model: cache= holds the outputs of a pass 1 done elsewhere; pass it with that accumulator=, or leave both out.")

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    ctx = (lambda: torch.autocast(device_type=device.type, dtype=amp)) if amp is not None else nullcontext
    acc = accumulator if accumulator is not None else CollapseAccumulator(num_classes, dim, device=device)
    layer_accs: list[CollapseAccumulator] | None = None
    try:
        with torch.no_grad():
            if acc.phase == "means" and stages == (2,):
                if int(acc.counts.sum()) == 0 and reduce_fn is None:
                    raise FixedclsError("measure_model: the accumulator saw no samples in pass 1; feed it the loader's features first.")
                acc.finalize_means(reduce_fn)

            def forward_batches():
                for batch in loader:
                    x, y = _split_batch(batch)
                    x = x.to(device, non_blocking=True)
                    if channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = torch.as_tensor(y).to(device, non_blocking=True)
                    with ctx():
                        logits, h = model(x, return_features=True)
                        pooled = inter(x) if inter is not None else []
                    yield h, y, logits, pooled

            if 1 in stages:
                cache = FeatureCache(cache_mb)
                for h, y, logits, pooled in forward_batches():
                    if inter is not None and layer_accs is None:
                        # the stages report nc1 alone: no nearest-centre decisions (a GEMM per batch) for them
                        layer_accs = [CollapseAccumulator(num_classes, f.shape[1], device=device, nearest_centre=False)
                                      for f in pooled]
                    acc.update_means(h, y)
                    for a, f in zip(layer_accs or [], pooled):
                        a.update_means(f, y)
                    cache.add(h, y, logits, pooled)
                if int(acc.counts.sum()) == 0 and reduce_fn is None:
                    raise FixedclsError("measure_model: the loader yielded no samples; pass a non-empty loader.")
                acc.finalize_means(reduce_fn)
                for a in layer_accs or []:
                    a.finalize_means(reduce_fn)
            # Pass 2 around the fixed class means: the cached outputs of pass 1's forward, or a second forward.
            for h, y, logits, pooled in (cache.batches if cache is not None and cache.complete else forward_batches()):
                acc.update_scatter(h, y, logits)
                for a, f in zip(layer_accs or [], pooled):
                    a.update_scatter(f, y)
            if ood is not None:
                acc.add_ood(ood)
            out = acc.compute(weight, bias, reduce_fn=reduce_fn)
            if minority:
                out.update(minority_collapse(acc.means, weight, minority, majority, present=acc.counts > 0))
            for i, a in zip(inter.keys if inter is not None and inter.keys else [], layer_accs or []):
                m = a.compute(None, reduce_fn=reduce_fn)
                for k in NC1_KEYS:
                    out[f"layer{i}/{k}"] = m[k]
    finally:
        model.train(True)  # then restore each module's own flag exactly
        for m, flag in modes:
            m.training = flag
    return out


@torch.no_grad()
def ood_feature_sums(model: torch.nn.Module, loader, *, device: torch.device | str, autocast_dtype=None,
                     channels_last: bool = False) -> torch.Tensor:
    """[d + 1] float64: the sum of ``model``'s features over the (out-of-distribution) samples of ``loader``
    and their count, what ``nc5`` needs (``measure_model(..., ood=...)``, ``OnlineCollapse.add_ood``).
    Under DDP each rank sums its own shard; the accumulators all-reduce the sums.  Batches are inputs, (inputs,),
    (inputs, labels, ...) with the labels ignored, or a mapping as measure_model reads it.  The train/eval state
    of every submodule and every random stream are restored: iterating a DataLoader draws from the global torch
    RNG, and a run that measures nc5 must train exactly as one that does not (so `collapse.ood` stays out of the
    run identity)."""
    device = torch.device(device)
    amp = autocast_dtype_of(autocast_dtype)
    dim = unwrap(model).head.weight.shape[1]
    total = torch.zeros(dim + 1, dtype=torch.float64, device=device)
    modes = [(m, m.training) for m in model.modules()]
    streams = rng_state()
    model.eval()
    try:
        for batch in loader:
            # OOD data has no labels: inputs alone, (inputs,) as TensorDataset(x) yields them, or (inputs, labels, ...)
            if torch.is_tensor(batch):
                x = batch
            else:
                x = batch[0] if isinstance(batch, (list, tuple)) and batch else _split_batch(batch)[0]
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp) if amp is not None else nullcontext():
                _, h = model(x, return_features=True)
            total += ood_sums(h, dim, device)
    finally:
        for m, flag in modes:
            m.training = flag
        set_rng_state(streams)
    return total


def prototype_alignment(model, loader, *, device, autocast: Optional[Callable] = None) -> tuple[list[str], list[list]]:
    """Per-class alignment of the class means to their classifier rows: (columns, rows).

    Rows: class, sample count, cos(mu_c, w_c) (uncentred, as `proto_cos`), ||mu_c - mu_G|| (mu_G the
    unweighted mean of the class means), for the classes present in `loader` (use one without
    augmentation: the train-eval loader). Class means come from `collapse.CollapseAccumulator`.
    """
    weight = model.head.weight.detach()
    num_classes, dim = weight.shape
    accumulator = CollapseAccumulator(num_classes, dim, device=device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for x, y in loader:
                with (autocast or nullcontext)():
                    _, h = model(x.to(device, non_blocking=True), return_features=True)
                accumulator.update_means(h.float(), torch.as_tensor(y).to(device))
    finally:
        for m, flag in modes:
            m.training = flag
    means = accumulator.finalize_means()
    present = (accumulator.counts > 0).nonzero().squeeze(1)
    centred = means[present] - means[present].mean(dim=0)
    w = weight.to(means.device, torch.float64)[present]
    cos = (means[present] * w).sum(1) / (means[present].norm(dim=1) * w.norm(dim=1)).clamp_min(1e-300)
    rows = [[int(c), int(accumulator.counts[c]), float(cos[i]), float(centred[i].norm())] for i, c in enumerate(present.tolist())]
    return ["class", "count", "cos(mu_c, w_c)", "||mu_c - mu_G||"], rows

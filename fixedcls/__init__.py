"""fixedcls: deep classifiers with fixed regular-polytope heads on any timm backbone."""


def load(path, device="cpu", ema=False):
    """A trained model from a checkpoint, a checkpoint folder or a `fixedcls-export --format fixedcls` folder:
    `.model` (eval mode, returns logits), `.transform` (PIL image -> input), `.class_names`, `.config`.
    See fixedcls.inference.load."""
    from .inference.loading import load as load_model  # imported here: `import fixedcls` stays free of torch

    return load_model(path, device=device, ema=ema)


__all__ = ["load"]

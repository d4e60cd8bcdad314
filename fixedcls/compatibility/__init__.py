"""Compatibility between model generations (CoReS, CL2R, IAM-CL2R): the criteria (`criteria`), the matrix of
trained models (`matrix`), stored galleries (`gallery`), training the generations (`generations`) and their
reports (`report`). `hoc_loss`, the higher-order compatibility loss (SPEC 4), is defined with the other training
losses in `fixedcls.models.heads` and handed on here.
"""


def __getattr__(name: str):
    # Handed on when asked for: importing the package stays free of torch (PEP 562).
    if name == "hoc_loss":
        from ..models.heads import hoc_loss

        return hoc_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["hoc_loss"]

"""Neural-collapse measures (SPEC section 3), split by job:

* :mod:`.stats` -- the mathematics: the measures from float64 statistics and the one-pass
  :class:`OnlineCollapse`, O(K d + d^2 + tile^2) memory;
* :mod:`.pairwise` -- the pairwise measures (cdnv, nc2_equiangle, nc2_maxangle, nc2_etf_error, gnc2_*)
  reduced over tiles of class pairs, never a K x K matrix;
* :mod:`.decisions` -- classifier and nearest-class-centre decisions (nc4, ncc_acc), over class chunks
  above the tile size;
* :mod:`.exact` -- :func:`nc_metrics` and the exact streaming :class:`CollapseAccumulator` (float64 sums,
  products of centred residuals in float32 or float64);
* :mod:`.measure` -- a model over a loader: :func:`measure_model` (subsets, backbone stages, one forward
  pass while :class:`FeatureCache` holds the features) and :func:`prototype_alignment`;
* :mod:`.minority` -- :func:`minority_collapse`, the minority-collapse measures of imbalanced training;
* :mod:`.report` -- :func:`collapse_speed`, :func:`plot_collapse`, :func:`format_table`;
* ``python -m fixedcls.collapse CHECKPOINT`` -- the command (:mod:`.__main__`).
"""
from .minority import MINORITY_KEYS, minority_collapse
from .measure import FeatureCache, measure_model, ood_feature_sums, prototype_alignment
from .report import DEFAULT_THRESHOLDS, collapse_speed, format_table, log_prototype_alignment, plot_collapse
from .exact import CollapseAccumulator, nc_metrics
from .stats import EXTRA_KEYS, METRIC_KEYS, NC1_KEYS, OOD_KEYS, OnlineCollapse, nc5, ood_sums

__all__ = [
    "METRIC_KEYS",
    "EXTRA_KEYS",
    "OOD_KEYS",
    "NC1_KEYS",
    "DEFAULT_THRESHOLDS",
    "nc_metrics",
    "CollapseAccumulator",
    "OnlineCollapse",
    "measure_model",
    "ood_feature_sums",
    "ood_sums",
    "nc5",
    "FeatureCache",
    "MINORITY_KEYS",
    "minority_collapse",
    "prototype_alignment",
    "collapse_speed",
    "plot_collapse",
    "format_table",
    "log_prototype_alignment",
]

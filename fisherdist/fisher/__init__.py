"""The sharded Fisher engine: what is computed (estimators, per-sample statistics), where it lives
(``Placement``, ``FisherState``) and how it is communicated (backend adapters, ``comm``)."""

from fisherdist.fisher.accumulator import FisherAccumulator
from fisherdist.fisher.api import DEFAULT_STATE, Accumulator
from fisherdist.fisher.layout import Fragment, Placement
from fisherdist.fisher.loss import model_labels, per_sample_nll
from fisherdist.fisher.run import estimate_fisher, fisher_step, make_accumulator
from fisherdist.fisher.spec import FisherSpec
from fisherdist.fisher.state import FisherState

__all__ = [
    "DEFAULT_STATE",
    "Accumulator",
    "FisherAccumulator",
    "FisherSpec",
    "FisherState",
    "Fragment",
    "Placement",
    "estimate_fisher",
    "fisher_step",
    "make_accumulator",
    "model_labels",
    "per_sample_nll",
]

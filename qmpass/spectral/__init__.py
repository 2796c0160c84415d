"""Spectral states of operators and the metrics between them (read-only numerics).

Used by ``analyze`` (states, FS distances, Bures angles for the QM-FRG and its report).
``compress`` uses two helpers: :func:`operator_norm` for the certificates of plan steps
and :func:`lower_gram` for the Gram matrices of its projections (both a block of a
weight at a time), and spectral states only for its cross-layer candidates
(:func:`~qmpass.frg.crosslayer.crosslayer_graph`). Every Gram matrix is summed a block
of the weight at a time (:mod:`qmpass.spectral.gram`). The source paper's formulas that
qmpass does not use live apart, in :mod:`qmpass.spectral.paper`, kept for the tests of its claims.
"""

from qmpass.spectral.gram import (
    augmented_lower_gram,
    frobenius_norm,
    lower_gram,
    times_blockwise,
)
from qmpass.spectral.metrics import (
    bures_angle,
    bures_angle_of_factors,
    fs_distance,
    fs_distance_matrix,
    input_factor,
    operator_norm,
    psi_matrix,
    quantum_relative_entropy,
    weighted_fs,
)
from qmpass.spectral.state import (
    SV_METHODS,
    SpectralState,
    SVMethod,
    augmented_matrix,
    augmented_singular_values,
    spectral_state,
)

__all__ = [
    "SV_METHODS",
    "SVMethod",
    "SpectralState",
    "augmented_lower_gram",
    "augmented_matrix",
    "augmented_singular_values",
    "bures_angle",
    "bures_angle_of_factors",
    "frobenius_norm",
    "fs_distance",
    "fs_distance_matrix",
    "input_factor",
    "lower_gram",
    "operator_norm",
    "psi_matrix",
    "quantum_relative_entropy",
    "spectral_state",
    "times_blockwise",
    "weighted_fs",
]

"""Spectral states of operators and the metrics between them (read-only numerics).

Used by ``analyze`` (states, FS distances, Bures angles for the QM-FRG and its report).
``compress`` uses one helper, :func:`operator_norm`, for the certificates of plan steps;
it computes no spectral states. The source paper's formulas that qmpass does not use
live apart, in :mod:`qmpass.spectral.paper`, kept for the tests of its claims.
"""

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
    "augmented_matrix",
    "augmented_singular_values",
    "bures_angle",
    "bures_angle_of_factors",
    "fs_distance",
    "fs_distance_matrix",
    "input_factor",
    "operator_norm",
    "psi_matrix",
    "quantum_relative_entropy",
    "spectral_state",
    "weighted_fs",
]

"""Spectral states of operators and the metrics between them (read-only numerics)."""

from qmpass.spectral.metrics import (
    bures_angle,
    bures_angle_of_factors,
    certificate,
    fs_distance,
    fs_distance_matrix,
    gksl_derivative,
    input_factor,
    operator_norm,
    paper_eq7_derivative,
    psi_matrix,
    quantum_relative_entropy,
    truncation_certificate,
    wasserstein2,
    weighted_fs,
)
from qmpass.spectral.state import (
    SpectralState,
    augmented_matrix,
    augmented_singular_values,
    spectral_state,
)

__all__ = [
    "SpectralState",
    "augmented_matrix",
    "augmented_singular_values",
    "bures_angle",
    "bures_angle_of_factors",
    "certificate",
    "fs_distance",
    "fs_distance_matrix",
    "gksl_derivative",
    "input_factor",
    "operator_norm",
    "paper_eq7_derivative",
    "psi_matrix",
    "quantum_relative_entropy",
    "spectral_state",
    "truncation_certificate",
    "wasserstein2",
    "weighted_fs",
]

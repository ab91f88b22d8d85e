"""osd_jax: Online Subspace Descent (arXiv 2408.12857) as composable optax transformations.

>>> import jax.numpy as jnp, optax, osd_jax
>>> tx = osd_jax.osd_adamw(learning_rate=1e-3, rank=4)
>>> state = tx.init({"w": jnp.zeros((16, 32)), "b": jnp.zeros(32)})
"""

from osd_jax import (
    layerwise,
    projectors,
    quantization,
    rounding,
    separability,
    skipping,
    transforms,
)
from osd_jax.alias import (
    DEFAULT_SCALE,
    ProjectorOptions,
    galore_adamw,
    osd_adamw,
    osd_lion,
    reference_projector_learning_rate,
    scale_by_learning_rate_then_decay,
    scale_by_lion_momentum,
    scale_by_reference_adam,
)
from osd_jax.diagnostics import (
    captured_energy,
    projector_orthogonality_error,
    projectors_of,
    subspace_drift,
)
from osd_jax.dimension_numbers import (
    DimensionNumbers,
    FullRankWarning,
    MatrixLayout,
    UnprojectedWarning,
)
from osd_jax.memory import expected_state_bytes, state_bytes
from osd_jax.sharding import optimizer_state_sharding
from osd_jax.subspace_descent import (
    ProjectedLeafState,
    SubspaceDescentState,
    is_projected_leaf,
    scale_by_subspace_descent,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SCALE",
    "DimensionNumbers",
    "FullRankWarning",
    "MatrixLayout",
    "ProjectedLeafState",
    "ProjectorOptions",
    "SubspaceDescentState",
    "captured_energy",
    "expected_state_bytes",
    "galore_adamw",
    "is_projected_leaf",
    "optimizer_state_sharding",
    "osd_adamw",
    "osd_lion",
    "projector_orthogonality_error",
    "layerwise",
    "projectors",
    "quantization",
    "rounding",
    "separability",
    "skipping",
    "transforms",
    "projectors_of",
    "reference_projector_learning_rate",
    "scale_by_learning_rate_then_decay",
    "scale_by_lion_momentum",
    "scale_by_reference_adam",
    "scale_by_subspace_descent",
    "state_bytes",
    "subspace_drift",
    "UnprojectedWarning",
]

"""H = I: score = v . g (TracIn-style gradient dot)."""

from __future__ import annotations

import dataclasses

from . import EstimatorBase, register


@register
@dataclasses.dataclass(frozen=True)
class Identity(EstimatorBase):
    name = "identity"
    extra_passes = 0
    uses_damping = False

    def precondition(self, ctx):
        return None

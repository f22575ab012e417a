"""H = I: score = v . g (TracIn-style gradient dot)."""

from __future__ import annotations

import dataclasses

from . import register


@register
@dataclasses.dataclass(frozen=True)
class Identity:
    name = "identity"
    extra_passes = 0
    needs_all_gradients = False
    uses_damping = False

    def precondition(self, ctx):
        return None

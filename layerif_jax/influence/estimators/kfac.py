"""K-FAC (Martens & Grosse 2015; for influence, Grosse et al. 2023): each LoRA tensor's
empirical Fisher as a Kronecker product of two covariances, inverted in their eigenbases.

For a LoRA map y = x W + s (x A) B, per layer (the packed engine measures them in the
backward of the training pass, beside the per-example gradients, `probed_linears`):

    A [I, r]:  G_A ~ C_x (x) C_du     C_x = mean over tokens of x x^T,
                                      C_du = (1/n) sum over tokens of du du^T, du = s dy B^T
    B [r, O]:  G_B ~ C_u (x) C_dy     u = x A, dy' = s dy (the gradient of the LoRA output)

(K-FAC "expand": the per-example gradient sum_t x_t du_t^T is treated as if its tokens
were independent, sum_t a_t (x) b_t ~ (1/N) (sum_t a_t) (x) (sum_t b_t) over the N
training tokens). With C = Q diag(e) Q^T (float64, on the host):

    h = Q_L [ (Q_L^T V Q_R) / (Lambda + lambda_b) ] Q_R^T,     Lambda_jk = e_L,j e_R,k

EK-FAC (`ekfac`, George et al. 2018) keeps the eigenbases and corrects Lambda on the
per-example gradients themselves. Each tensor is its own block: with unit "module" or
"block" a unit's curvature is block-diagonal over its tensors, each damped with the
unit's lambda_b. The damping is added to Lambda (not split over the two factors), so
the damping conventions of the driver apply unchanged.

Curvature: the empirical Fisher (default; the factors from the backward of the training
labels, in the training pass itself) or the true Fisher (curvature="true_fisher", as
Kronfluence's default): the factors from one more forward and backward over the training
set in which every position's label is a token drawn from the model's own prediction
(`engines.general.draw_next_tokens`: per example and position, the same on either engine
and in any chunking); its expectation is the Gauss-Newton matrix of the token
cross-entropy. The scores still dot h with the training examples' own gradients; with
damping "mean_eigenvalue" the trace is the drawn gradients' mean squared norm.

`factors_dir`: the eigenbases and eigenvalues are saved there with orbax (with their
SHA-256 and a fingerprint of the training gradients) and reused by later runs on the
same model, adapter and training set, e.g. against other validation sets; a directory
that holds another run's factors is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from ...errors import LayerIFError
from ..distributed import to_host
from . import EstimatorBase, register, to_jnp

META = "layerif_factors.json"


@register
@dataclasses.dataclass(frozen=True)
class KFAC(EstimatorBase):
    name = "kfac"          # its factors come from the training pass's backward
    extra_passes = 0
    needs_factors = True
    curvatures = ("empirical_fisher", "true_fisher")
    factors_dir: str | None = None

    def precondition(self, ctx):
        basis = self._basis(ctx)
        lam = to_host(ctx.leaf_view(ctx.lam), np.float64)        # [P] in leaf order
        start = np.cumsum([0] + [len(ls) for ls in ctx.part.leaf_layers])
        h = []
        for k, (x, (QL, QR, Lam)) in enumerate(zip(ctx.v, basis)):
            V = to_host(x, np.float64)                           # [M, P_k, a, b]
            rot = np.swapaxes(QL, -1, -2)[None] @ V @ QR[None]
            rot /= Lam[None] + lam[start[k]:start[k + 1], None, None][None]
            h.append(QL[None] @ rot @ np.swapaxes(QR, -1, -2)[None])
        ctx.report.update(min_eigenvalue=float(min(b[2].min() for b in basis)),
                          max_eigenvalue=float(max(b[2].max() for b in basis)))
        return to_jnp(h)

    def eigenvalues(self, ctx, QL, QR, eL, eR) -> list[np.ndarray]:
        """Lambda [P_k, a, b] per leaf: K-FAC's products of the factors' eigenvalues."""
        return [l[:, :, None] * r[:, None, :] for l, r in zip(eL, eR)]

    def _basis(self, ctx) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(Q_L, Q_R, Lambda) per leaf, from `factors_dir` when it holds them."""
        fingerprint = _fingerprint(ctx, self.name)
        if self.factors_dir is not None:
            saved = _load(Path(self.factors_dir), fingerprint)
            if saved is not None:
                ctx.report["factors_reused_from"] = str(self.factors_dir)
                return saved
        factors = ctx.kfac_factors(self.name)
        for k, f in enumerate(factors):
            if f is None or np.ndim(ctx.v[k]) != 4:
                raise LayerIFError(f"{self.name} needs matrix-shaped parameters with Kronecker "
                                   f"factors; {ctx.part.leaf_names[k]} has none")
        cache: dict = {}   # maps sharing an input share x x^T: decomposed once
        eL, QL = zip(*(_eigh(left, cache) for left, _ in factors))
        eR, QR = zip(*(_eigh(right, cache) for _, right in factors))
        basis = list(zip(QL, QR, self.eigenvalues(ctx, QL, QR, eL, eR)))
        if self.factors_dir is not None:
            _save(Path(self.factors_dir), basis, fingerprint)
            ctx.report["factors_saved_to"] = str(self.factors_dir)
        return basis


def _eigh(c: np.ndarray, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0: a covariance, up to rounding) and vectors, float64;
    an identical matrix met before is not decomposed again."""
    key = (c.shape, hashlib.sha256(np.ascontiguousarray(c).view(np.uint8)).digest())
    if key not in cache:
        e, q = np.linalg.eigh((c + np.swapaxes(c, -1, -2)) / 2)
        cache[key] = (np.maximum(e, 0.0), q)
    return cache[key]


def _fingerprint(ctx, name: str) -> dict:
    """What the factors depend on: the estimator, the parameters' layout, n and the
    training gradients (their squared norms per unit change with the model, the adapter
    and the data)."""
    return {"estimator": name, "curvature": ctx.curvature, "n": int(ctx.n),
            "leaves": list(ctx.part.leaf_names),
            "shapes": [list(np.shape(x)[1:]) for x in ctx.v],
            "grad_sq_norms": to_host(ctx.sq_u.sum(0), np.float64).ravel().tolist()}


def _differs(saved: dict, now: dict) -> str | None:
    from ...checksum import first_difference
    keys = ("estimator", "curvature", "n", "leaves", "shapes")
    saved = {"curvature": "empirical_fisher", **saved}   # saved before the true Fisher
    diff = first_difference({k: saved.get(k) for k in keys}, {k: now[k] for k in keys})
    if diff:
        return diff
    a, b = np.asarray(saved.get("grad_sq_norms", [])), np.asarray(now["grad_sq_norms"])
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=0):
        return "the training gradients differ (another model, adapter or training set)"
    return None


def _load(path: Path, fingerprint: dict):
    import orbax.checkpoint as ocp

    from ... import checksum
    from ...io import read_json
    if not path.exists():
        return None
    if not (path / META).is_file():
        raise LayerIFError(f"{path} exists but holds no complete saved factors (no {META}): "
                           "give another factors_dir")
    meta = read_json(path / META)
    diff = _differs(meta.get("fingerprint", {}), fingerprint)
    if diff:
        raise LayerIFError(f"{path} holds the factors of another run ({diff}); give another "
                           "factors_dir")
    try:
        tree = ocp.StandardCheckpointer().restore((path / "arrays").absolute())
        host = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in tree.items()}
    except Exception as e:  # noqa: BLE001 - orbax raises many types
        raise LayerIFError(f"cannot read the factors in {path}: {str(e).splitlines()[0]}") from None
    bad = checksum.first_mismatch(host, meta.get("digests", {}))
    if bad is not None:
        raise LayerIFError(f"the factors in {path} are damaged (checksum mismatch in {bad})")
    return [(host[f"leaf{k}"]["QL"], host[f"leaf{k}"]["QR"], host[f"leaf{k}"]["Lambda"])
            for k in range(len(host))]


def _save(path: Path, basis, fingerprint: dict) -> None:
    """Arrays first (orbax finalises its folder atomically), the metadata last: a
    directory without it is an interrupted save and is never read as factors."""
    import orbax.checkpoint as ocp

    from ... import checksum
    from ...io import write_json
    tree = {f"leaf{k}": {"QL": q_l, "QR": q_r, "Lambda": lam}
            for k, (q_l, q_r, lam) in enumerate(basis)}
    path.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((path / "arrays").absolute(), tree)
    ckpt.wait_until_finished()
    write_json(path / META, {"fingerprint": fingerprint, "digests": checksum.tree_digests(tree)})


__all__ = ["KFAC"]

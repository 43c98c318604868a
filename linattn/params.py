"""The parameter pytree shared by the model and the theory (SPEC section 2).

Shape notation: L layers, H heads, d covariate dimension, D = d + 2 token width.
A token is z = (1, x, y): index 0 is the constant, 1..d the covariates, D-1 the label.

A parameter tree is a plain dict of arrays of shape (L, H, D, D):
- merged form:   {"V": ..., "KQ": ...}, with KQ_h = Wq_h^T Wk_h;
- separate form: {"V": ..., "K": ..., "Q": ...}, the key and query matrices Wk_h, Wq_h.
V holds the value matrices Wv_h; in one layer only its last row (the label row) matters.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

FORMAT = "linattn-params-v1"
NORMALIZATIONS = ("tokens", "shots")
MERGED_KEYS = ("KQ", "V")
SEPARATE_KEYS = ("K", "Q", "V")


def is_merged(params: Mapping) -> bool:
    """True for the merged {"KQ", "V"} form, False for {"K", "Q", "V"}; errors otherwise."""
    keys = tuple(sorted(params))
    if keys == MERGED_KEYS:
        return True
    if keys == SEPARATE_KEYS:
        return False
    raise ValueError(
        f"parameter tree has keys {list(keys)}; allowed are {list(MERGED_KEYS)} (merged) "
        f"or {list(SEPARATE_KEYS)} (separate key/query)"
    )


def dims(params: Mapping) -> tuple[int, int, int]:
    """(layers, heads, d) of a parameter tree, after checking its shapes."""
    check_params(params)
    L, H, D, _ = params["V"].shape
    return L, H, D - 2


def check_params(params: Mapping, d: int | None = None) -> None:
    """Raise ValueError naming the first leaf whose shape is wrong.

    Every leaf must be (L, H, D, D) with the same L, H, D, and D = d + 2 when d is given.
    """
    is_merged(params)
    ref = None
    for name in sorted(params):
        shape = tuple(np.shape(params[name]))
        if len(shape) != 4 or shape[2] != shape[3]:
            raise ValueError(
                f"parameter {name!r} has shape {shape}; expected (layers, heads, d+2, d+2)"
            )
        if ref is None:
            ref = (name, shape)
        elif shape != ref[1]:
            raise ValueError(
                f"parameter {name!r} has shape {shape} but {ref[0]!r} has {ref[1]}; "
                "all leaves must share (layers, heads, d+2, d+2)"
            )
        if d is not None and shape[2] != d + 2:
            raise ValueError(
                f"parameter {name!r} has token width {shape[2]} (d = {shape[2] - 2}) "
                f"but the data has d = {d} (token width {d + 2})"
            )


def effective_kq(params: Mapping) -> jax.Array:
    """KQ_h = Wq_h^T Wk_h for every layer and head, shape (L, H, D, D)."""
    if is_merged(params):
        return params["KQ"]
    return jnp.einsum("lhji,lhjk->lhik", params["Q"], params["K"])


def value_row(params: Mapping) -> jax.Array:
    """The label row v_h of each value matrix, shape (L, H, D) (SPEC section 2)."""
    return params["V"][..., -1, :]


def to_merged(params: Mapping) -> dict:
    """The merged tree that gives the same predictions."""
    return {"KQ": effective_kq(params), "V": params["V"]}


def init_params(
    key: jax.Array,
    d: int,
    *,
    layers: int = 1,
    heads: int = 1,
    merged: bool = True,
    std: float = 0.05,
    dtype=jnp.float32,
) -> dict:
    """Reference initialization: every entry i.i.d. N(0, std^2), std = 0.05 (SPEC section 2)."""
    if d < 1 or layers < 1 or heads < 1:
        raise ValueError(f"need d, layers, heads >= 1; got d={d}, layers={layers}, heads={heads}")
    return _init(key, MERGED_KEYS if merged else SEPARATE_KEYS, (layers, heads, d + 2, d + 2), std, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 4))
def _init(key, names: tuple, shape: tuple, std, dtype) -> dict:
    """init_params' draws as one compiled program (eagerly, five small ones)."""
    draws = jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(jax.random.split(key, len(names)))
    return {n: std * g for n, g in zip(names, draws)}


def zeros_params(d: int, *, layers: int = 1, heads: int = 1, merged: bool = True, dtype=jnp.float32) -> dict:
    """All-zero parameters, a starting point for hand-built ones."""
    names = MERGED_KEYS if merged else SEPARATE_KEYS
    return {n: jnp.zeros((layers, heads, d + 2, d + 2), dtype) for n in names}


def icl_params(d: int, gamma: float, w: float, *, heads: int = 1, dtype=jnp.float32) -> dict:
    """Merged one-layer parameters with Gamma = gamma I (x-block of KQ) and v = w e_y.

    This is the form of the pretraining optimum (SPEC section 4): the prediction is
    gamma * w / (n+1) * sum_j (x_q . x_j) y_j.
    """
    D = d + 2
    eye = np.zeros((1, heads, D, D), dtype)  # host constants: concrete gamma and w need no compiled op
    eye[..., 1 : d + 1, 1 : d + 1] = np.eye(d)
    label = np.zeros((1, heads, D, D), dtype)
    label[..., -1, -1] = 1.0
    return {"KQ": jnp.asarray(gamma * eye, dtype), "V": jnp.asarray(w * label, dtype)}


def save_params(path: str | Path, params: Mapping, *, normalization: str = "tokens") -> None:
    """Write linattn-params-v1 JSON: {"format", "d", "normalization", "V", "KQ" | "K","Q"}."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} unknown; allowed: {list(NORMALIZATIONS)}")
    Path(path).write_text(json.dumps(params_to_json(params, normalization=normalization)))


def params_to_json(params: Mapping, *, normalization: str = "tokens") -> dict:
    """The linattn-params-v1 dictionary of a tree (nested lists of floats)."""
    _, _, d = dims(params)
    out = {"format": FORMAT, "d": d, "normalization": normalization}
    for name in sorted(params):
        out[name] = np.asarray(params[name], dtype=np.float64).tolist()
    return out


def params_from_json(obj: Mapping, *, dtype=jnp.float32) -> tuple[dict, str]:
    """Parse a linattn-params-v1 dictionary; returns (params, normalization).

    Raises ValueError saying exactly what is missing or has the wrong shape.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"parameter file must hold a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise ValueError(f"parameter file has format {obj.get('format')!r}; expected {FORMAT!r}")
    for field in ("d", "normalization", "V"):
        if field not in obj:
            raise ValueError(f"parameter file lacks the field {field!r}")
    d = obj["d"]
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"parameter file has d = {d!r}; expected a positive integer")
    norm = obj["normalization"]
    if norm not in NORMALIZATIONS:
        raise ValueError(f"parameter file has normalization {norm!r}; allowed: {list(NORMALIZATIONS)}")
    names = [n for n in ("K", "Q", "KQ") if n in obj]
    if names not in (["KQ"], ["K", "Q"]):
        raise ValueError(
            f"parameter file has attention fields {names}; expected ['KQ'] or ['K', 'Q']"
        )
    params = {}
    for name in names + ["V"]:
        try:
            arr = np.asarray(obj[name], dtype=np.float64)
        except (ValueError, TypeError) as err:
            raise ValueError(f"field {name!r} is not a rectangular array of numbers: {err}") from None
        if arr.ndim != 4 or arr.shape[2:] != (d + 2, d + 2):
            raise ValueError(
                f"field {name!r} has shape {arr.shape}; expected [layers][heads][{d + 2}][{d + 2}] "
                f"for d = {d}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"field {name!r} holds non-finite values")
        params[name] = jnp.asarray(arr, dtype=dtype)
    check_params(params, d)
    return params, norm


def load_params(path: str | Path, *, dtype=jnp.float32) -> tuple[dict, str]:
    """Read a linattn-params-v1 JSON file; returns (params, normalization)."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"cannot read parameter file {str(path)!r}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"parameter file {str(path)!r} is not valid JSON: {err}") from None
    return params_from_json(obj, dtype=dtype)


def tree_sq_dist(a: Mapping, b: Mapping) -> jax.Array:
    """Sum of squared differences over all leaves (for L2 pulls toward reference weights)."""
    return sum(jnp.sum((a[k] - b[k]) ** 2) for k in a)


def flatten(params: Mapping) -> jax.Array:
    """Every leaf in one vector, in jax.flatten_util.ravel_pytree order (leaves by sorted name,
    each row-major): the coordinates of curvature matrices such as theory.antiforgetting's."""
    return ravel_pytree(dict(params))[0]


def curvature_dist(a: Mapping, b: Mapping, curvature) -> jax.Array:
    """(1/2) (a - b)^T F (a - b) over the flattened trees (`flatten`), F = `curvature` of shape (P, P)
    with P the number of parameters: the EWC penalty (objective "ewc") when F is the curvature of
    the pretraining risk at b."""
    delta = flatten(a) - flatten(b)
    F = jnp.asarray(curvature)
    if F.shape != (delta.size, delta.size):
        raise ValueError(f"curvature has shape {F.shape}; expected ({delta.size}, {delta.size}) for a tree of "
                         f"{delta.size} parameters (leaves {sorted(a)})")
    return 0.5 * delta @ (F @ delta)


def interpolate(pre: Mapping, ft: Mapping, alpha) -> dict:
    """WiSE-FT weights (1 - alpha) pre + alpha ft, leaf by leaf (alpha = 0: pre, 1: ft).

    Interpolates the parameters themselves: for separate trees K and Q are interpolated separately,
    so the effective Q^T K is quadratic in alpha, not the interpolation of the two Q^T K. `alpha`
    may be traced; a concrete one must lie in [0, 1].
    """
    if is_merged(pre) != is_merged(ft):
        raise ValueError(f"cannot interpolate a tree with leaves {sorted(pre)} and one with leaves {sorted(ft)}; "
                         "convert both to the same form first (to_merged)")
    for k in pre:
        if np.shape(pre[k]) != np.shape(ft[k]):
            raise ValueError(f"leaf {k!r} has shape {np.shape(pre[k])} in pre but {np.shape(ft[k])} in ft")
    try:
        a = np.asarray(alpha, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        a = None  # traced: not checked
    if a is not None and (a.ndim or not (0.0 <= a <= 1.0)):
        raise ValueError(f"alpha must be one number in [0, 1]; got {alpha!r}")
    return {k: (1 - alpha) * pre[k] + alpha * ft[k] for k in pre}


def interpolation_path(pre: Mapping, ft: Mapping, alphas) -> dict:
    """The WiSE-FT trees at every alpha in `alphas`, stacked on a leading axis (A, L, H, D, D)."""
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or np.any(~(alphas >= 0)) or np.any(alphas > 1):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of numbers in [0, 1]; got {alphas.tolist()}")
    trees = [interpolate(pre, ft, float(a)) for a in alphas]
    return {k: jnp.stack([t[k] for t in trees]) for k in pre}


def gamma_w(params: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(g, w) of one-layer trees (any leading axes): g the mean diagonal of the x-block of the
    effective KQ of head 0, w the label weight v_y of head 0 (SPEC section 4: ICL uses the product g w)."""
    V = np.asarray(params["V"])
    lead = V.shape[:-4]
    flat = {k: jnp.asarray(np.asarray(v).reshape((-1,) + np.shape(v)[-4:])) for k, v in params.items()}
    kq = np.asarray(jax.vmap(effective_kq)(flat))[:, 0, 0]
    d = kq.shape[-1] - 2
    g = np.trace(kq[:, 1 : d + 1, 1 : d + 1], axis1=-2, axis2=-1) / d
    return g.reshape(lead), V[..., 0, 0, -1, -1]


def family_member(params: Mapping) -> np.ndarray:
    """kappa = (Q^T K)[0,0] * w (head 0; KQ[0,0] * w for merged trees) of one-layer trees, any
    leading axes: the coordinate along the full-ZS minimizer family that the zero-shot loss leaves
    free (DERIVATIONS section 3, branch A), the flat coordinate of issue #13."""
    V = np.asarray(params["V"])
    lead = V.shape[:-4]
    flat = {k: jnp.asarray(np.asarray(v).reshape((-1,) + np.shape(v)[-4:])) for k, v in params.items()}
    k00 = np.asarray(jax.vmap(effective_kq)(flat))[:, 0, 0, 0, 0]
    return k00.reshape(lead) * V[..., 0, 0, -1, -1]

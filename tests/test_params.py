"""Parameter files: round trip and precise errors (linattn-params-v1)."""

import json

import jax
import numpy as np
import pytest

from linattn import params as P


@pytest.mark.parametrize("merged", [True, False])
def test_round_trip(tmp_path, merged):
    p = P.init_params(jax.random.PRNGKey(0), 4, layers=2, heads=3, merged=merged)
    f = tmp_path / "p.json"
    P.save_params(f, p, normalization="shots")
    obj = json.loads(f.read_text())
    assert obj["format"] == "linattn-params-v1" and obj["d"] == 4 and obj["normalization"] == "shots"
    assert np.shape(obj["V"]) == (2, 3, 6, 6)
    q, norm = P.load_params(f)
    assert norm == "shots" and set(q) == set(p)
    for k in p:
        np.testing.assert_array_equal(np.asarray(q[k]), np.asarray(p[k]))


def _valid():
    return P.params_to_json(P.init_params(jax.random.PRNGKey(0), 2))


@pytest.mark.parametrize("edit,message", [
    (lambda o: o.update(format="other"), "format 'other'"),
    (lambda o: o.pop("V"), "lacks the field 'V'"),
    (lambda o: o.update(d=0), "d = 0"),
    (lambda o: o.update(normalization="bad"), "normalization 'bad'"),
    (lambda o: o.update(K=o["KQ"]), r"attention fields \['K', 'KQ'\]"),
    (lambda o: o.update(KQ=[[[[0.0] * 3] * 3]]), r"'KQ' has shape \(1, 1, 3, 3\); expected \[layers\]\[heads\]\[4\]\[4\]"),
    (lambda o: o.update(V=[[[[0.0, 1.0], [2.0]]]]), "'V' is not a rectangular array"),
])
def test_load_errors_say_what_is_wrong(tmp_path, edit, message):
    obj = _valid()
    edit(obj)
    f = tmp_path / "p.json"
    f.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=message):
        P.load_params(f)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        P.load_params(tmp_path / "missing.json")
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        P.load_params(f)


def test_mismatched_leaf_shapes():
    p = P.init_params(jax.random.PRNGKey(0), 3, merged=False)
    p["K"] = p["K"][:, :, :4, :4]
    with pytest.raises(ValueError, match=r"'Q' has shape \(1, 1, 5, 5\) but 'K' has \(1, 1, 4, 4\)"):
        P.check_params(p)

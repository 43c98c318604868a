"""sims.softmax end to end at a tiny size: every model and method, findings, checkpoints, the
figure, resuming without retraining, and fine-tuning a saved checkpoint in one command."""

import json

import numpy as np
import pytest

from linattn import softmax as SM
from sims import softmax as study

TINY = ["--layers", "1", "--heads", "2", "--width", "8", "--mlp", "8", "--steps", "20", "--ft-steps", "10",
        "--batch", "32", "--seeds", "2", "--m", "5", "--n-ft", "5", "--max-shots", "10", "--eval-samples", "100",
        "--eval-chunk", "100", "--dataset", "1000", "--shots", "0,2,5,10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("softmax") / "run"
    assert study.main(TINY + ["--quick", "--out", str(out)]) == 0
    return out


def test_results_hold_every_model_method_and_baseline(run):
    res = json.loads((run / "results.json").read_text())
    for model in study.MODELS:
        for name in ("pretrained", *study.METHODS):
            entry = res["curves"][f"{model}/{name}"]
            for task in res["tasks"]:
                assert len(entry[task]["mean"]) == len(entry["shots"]) and np.all(np.asarray(entry[task]["se"]) >= 0)
        assert set(res["findings"][model]) == {"zs_all_forgets", "zs_v_keeps", "zs_v_icl_gain", "zsfs_v_target",
                                               "zsfs_v_unseen"}
    assert "theory_gradient_flow" in res["curves"]["linear/zs_all"]["theta0"]
    assert {k for k in res["curves"] if k.startswith("baseline/")} == {
        "baseline/least squares", "baseline/ridge (lambda = d sigma^2)", "baseline/Bayes (sphere prior)", "baseline/zero"}
    assert (run / "softmax_vs_linear.png").is_file()
    assert json.loads((run / "config.json").read_text())["versions"]["flax"]


def test_zero_shot_kq_cannot_move_the_softmax_model(run):
    """With the query alone every attention row is one weight 1: the ZS loss has no gradient in Q, K
    and SGD leaves the pretrained weights as they are, bit for bit."""
    pre = SM.load_params(run / "checkpoints" / "pretrained_seed0.msgpack")
    kq = SM.load_params(run / "checkpoints" / "zs_kq_seed0.msgpack")
    for k in pre:
        assert np.array_equal(np.asarray(pre[k]), np.asarray(kq[k])), k


def test_rerun_resumes_without_training(run, monkeypatch):
    before = (run / "pieces" / "curves.npz").stat().st_mtime_ns
    monkeypatch.setattr("linattn.train.train_plan", lambda *a, **k: pytest.fail("retrained"))
    assert study.main(TINY + ["--quick", "--out", str(run), "--no-figures"]) == 0
    assert (run / "pieces" / "curves.npz").stat().st_mtime_ns == before


def test_finetune_a_checkpoint_in_one_command(run, tmp_path, capsys):
    src, dst = run / "checkpoints" / "pretrained_seed1.msgpack", tmp_path / "ft.msgpack"
    assert study.main(TINY + ["--quick", "--from", str(src), "--method", "zs_v", "--save", str(dst)]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["saved"] == str(dst) and np.isfinite(said["final_loss"])
    pre, ft = SM.load_params(src), SM.load_params(dst)
    changed = {k for k in pre if not np.array_equal(np.asarray(pre[k]), np.asarray(ft[k]))}
    assert changed == {"V", "O"}

"""Every `python -m` entry point on bad input: exit 2, one line naming the bad value and what is
allowed, nothing written, no training started (issue #9). And --help: exit 0, defaults shown.

The CLIs are called in-process through their main(argv), from an empty working directory.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from sims import forgetting as S

MODULES = ("sims.forgetting", "sims.plot", "sims.sgd_gap", "sims.benchmark", "theory.risk", "theory.optimal",
           "theory.bench", "theory.predict", "sims.sweep", "sims.launch", "sims.phase",
           "sims.softmax", "sims.plot_softmax")

# (module, argv, substrings of the error line: the bad value and what is allowed). {P}: a valid
# parameter file, {F}: an existing plain file, {X}: a path that must not be created; {G...}: grid
# files (GRIDS below).
CASES = [
    ("sims.forgetting", ["--methods", "bogus"], ["'bogus'", "allowed", "zs_replay_all"]),
    ("sims.forgetting", ["--methods", "zs_v", "nope"], ["'nope'", "allowed"]),
    ("sims.forgetting", ["--sweep-methods", "bogus"], ["'bogus'", "sweep_methods", "allowed"]),
    ("sims.forgetting", ["--steps", "0"], ["--steps", "'0'", "> 0"]),
    ("sims.forgetting", ["--batch", "-5"], ["--batch", "'-5'", "> 0"]),
    ("sims.forgetting", ["--ft-steps", "ten"], ["--ft-steps", "'ten'", "integer"]),
    ("sims.forgetting", ["--seeds", "1.5"], ["--seeds", "'1.5'", "integer"]),
    ("sims.forgetting", ["--lr", "-1"], ["--lr", "'-1'", "> 0"]),
    ("sims.forgetting", ["--lr", "nan"], ["--lr", "'nan'", "> 0"]),
    ("sims.forgetting", ["--noise", "-0.1"], ["--noise", "'-0.1'", ">= 0"]),
    ("sims.forgetting", ["--d", "0"], ["--d", "'0'", "> 0"]),
    ("sims.forgetting", ["--quick", "--full"], ["--full", "not allowed with", "--quick"]),
    ("sims.forgetting", ["--sweep-seeds", "3"], ["sweep_seeds", "3 > 2", "<= seeds"]),
    ("sims.forgetting", ["--pretrain-ds", "5"], ["pretrain_ds", "[5]", "other than d = 5"]),
    ("sims.forgetting", ["--max-shots", "10"], ["max_shots", "got 10", ">= n_ft"]),
    ("sims.forgetting", ["--sweep-weights", "-1"], ["sweep_weights", "[-1.0]", "> 0"]),
    ("sims.forgetting", ["--frontier-weights", "0"], ["frontier_weights", "[0.0]", "> 0"]),
    ("sims.forgetting", ["--sweep-weights"], ["sweep_weights []", "at least one"]),
    ("sims.forgetting", ["--devices", "0"], ["--devices", "'0'", "> 0"]),
    ("sims.forgetting", ["--devices", "999"], ["--devices 999", "allowed 1.."]),
    ("sims.forgetting", ["--stop-after", "0"], ["--stop-after", "'0'", "> 0"]),
    ("sims.forgetting", ["--eval-samples", "0"], ["--eval-samples", "'0'", "> 0"]),
    ("sims.forgetting", ["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    ("sims.forgetting", ["--out", "{F}"], ["{F}", "is a file"]),
    ("sims.forgetting", ["--out", "{F}/sub"], ["{F}", "is a file"]),
    ("sims.forgetting", ["--import", "no_such_module_x"], ["'no_such_module_x'", "importable"]),
    ("sims.forgetting", ["--early-stops", "0", "0.5"], ["early_stops", "[0.0, 0.5]", "in (0, 1)"]),
    ("sims.forgetting", ["--early-stops", "1"], ["early_stops", "[1.0]", "in (0, 1)"]),
    ("sims.phase", [], ["--out"]),
    ("sims.phase", ["--out", "{F}"], ["{F}", "is a file"]),
    ("sims.phase", ["--out", "{X}", "--plot-only"], ["{X}", "no phase.json", "allowed"]),
    ("sims.phase", ["--out", "{X}", "--bogus"], ["unrecognized arguments: --bogus"]),
    ("sims.plot", [], ["run_dir"]),
    ("sims.plot", ["{X}"], ["{X}", "no results.json", "allowed"]),
    ("sims.plot", ["{F}"], ["{F}", "no results.json"]),
    ("sims.plot", [".", "--bogus"], ["unrecognized arguments: --bogus"]),
    ("sims.sgd_gap", ["{X}"], ["{X}", "no config.json", "allowed"]),
    ("sims.sgd_gap", [".", "--batches", "0"], ["--batches", "'0'", "> 0"]),
    ("sims.sgd_gap", [".", "--shots", "-2"], ["--shots", "'-2'", ">= 0"]),
    ("theory.risk", [], ["--params"]),
    ("theory.risk", ["--params", "{P}", "--shots", "0,-1"], ["-1", ">= 0"]),
    ("theory.risk", ["--params", "{P}", "--shots", "0,a"], ["'a'", "integers"]),
    ("theory.risk", ["--params", "{P}", "--task", "sphere2"], ["'sphere2'", "choose from", "'random'"]),
    ("theory.risk", ["--params", "{X}"], ["{X}", "cannot read"]),
    ("theory.risk", ["--params", "{F}"], ["{F}", "not valid JSON"]),
    ("theory.risk", ["--params", "{P}", "--task", "fixed"], ["--task fixed", "--theta"]),
    ("theory.risk", ["--params", "{P}", "--task", "fixed", "--theta=1,0"], ["2 entries", "d = 5"]),
    ("theory.risk", ["--params", "{P}", "--task", "fixed", "--theta=1,x,0,0,0"], ["'x'", "numbers"]),
    ("theory.risk", ["--params", "{P}", "--theta=1,0,0,0,0"], ["--theta", "only for --task fixed"]),
    ("theory.risk", ["--params", "{P}", "--noise", "-1"], ["--noise", "'-1'", ">= 0"]),
    ("theory.risk", ["--params", "{P}", "--normalization", "n"], ["'n'", "choose from", "'tokens'"]),
    ("theory.optimal", [], ["--method"]),
    ("theory.optimal", ["--method", "nope"], ["'nope'", "choose from", "'pretrain'"]),
    ("theory.optimal", ["--method", "zs_v"], ["'zs_v'", "--theta"]),
    ("theory.optimal", ["--method", "zs_v", "--theta=1,0"], ["(2,)", "(5,)"]),
    ("theory.optimal", ["--method", "pretrain", "--shots", "-1"], ["--shots", "'-1'", ">= 0"]),
    ("theory.optimal", ["--method", "pretrain", "--d", "0"], ["--d", "got 0", ">= 1"]),
    ("theory.optimal", ["--method", "pretrain", "--out", "{X}/P.json"], ["{X}", "does not exist"]),
    ("theory.optimal", ["--method", "pretrain", "--out", "."], ["'.'", "is a folder"]),
    ("theory.optimal", ["--method", "zs_v", "--theta=1,0,0,0,0", "--params", "{X}"], ["{X}", "cannot read"]),
    ("theory.predict", [], ["--params"]),
    ("theory.predict", ["--params", "{P}"], ["--theta"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0"], ["2 entries", "d = 5"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--objective", "zz"], ["'zz'", "choose from", "'zs'"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--subset", "w"], ["'w'", "allowed", "'kq'"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--batch", "0"], ["--batch", "'0'", "> 0"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--shots", "0,-1"], ["-1", ">= 0"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--task", "fix"], ["'fix'", "choose from", "'fixed'"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--momentum", "1"], ["--momentum 1", "< 1"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--dataset", "100"], ["--dataset 100", "not modelled"]),
    ("theory.predict", ["--params", "{P}", "--theta=1,0,0,0,0", "--paths", "0"], ["--paths", "'0'", "> 0"]),
    ("theory.predict", ["--params", "{X}", "--theta=1,0,0,0,0"], ["{X}", "cannot read"]),
    ("theory.bench", ["--d", "0"], ["--d", "'0'", "> 0"]),
    ("theory.bench", ["--heads", "x"], ["--heads", "'x'", "integer"]),
    ("sims.benchmark", ["--workload", "nope"], ["'nope'", "choose from"]),
    ("sims.benchmark", ["--compile-profile", "medium"], ["'medium'", "choose from"]),
    ("sims.benchmark", ["--steps", "0"], ["--steps", "'0'", "> 0"]),
    ("sims.benchmark", ["--lr", "-0.5"], ["--lr", "'-0.5'", "> 0"]),
    ("sims.benchmark", ["--lr", "nan"], ["--lr", "'nan'", "> 0"]),
    ("sims.benchmark", ["--eval-samples", "0"], ["--eval-samples", "'0'", "> 0"]),
    ("sims.benchmark", ["--devices", "999"], ["--devices 999", "allowed 1.."]),
    ("sims.sweep", ["{Gaxis}", "--out", "{X}"], ["[axes] 'dd' unknown", "allowed:", "n_ft", "noise"]),
    ("sims.sweep", ["{Gempty}", "--out", "{X}"], ["[axes] n_ft is empty", "at least one value"]),
    ("sims.sweep", ["{Gtype}", "--out", "{X}"], ["n_ft: '5' is a str", "allowed: integers"]),
    ("sims.sweep", ["{Gfloat}", "--out", "{X}"], ["noise: 'high' is a str", "allowed: numbers"]),
    ("sims.sweep", ["{Gok}", "--out", "{X}", "--max-cells", "3"], ["4 cells", "--max-cells 3", "at most 3"]),
    ("sims.sweep", ["{Gmethod}", "--out", "{X}"], ["methods: 'zs_bogus' unknown", "allowed", "zs_all"]),
    ("sims.sweep", ["{Gkey}", "--out", "{X}"], ["grid key 'axis' unknown", "allowed", "axes"]),
    ("sims.sweep", ["{Gcell}", "--out", "{X}"], ["cell {'n_ft': 8}", "max_shots", ">= n_ft"]),
    ("sims.sweep", ["{Gshots}", "--out", "{X}"], ["[outputs] shots: 50 > max_shots 40", "allowed: 0..40"]),
    ("sims.sweep", ["{F}", "--out", "{X}"], ["{F}", "not valid TOML"]),
    ("sims.sweep", ["{X}", "--out", "{X}"], ["{X}", "cannot read"]),
    ("sims.sweep", ["{Gok}", "--out", "{F}"], ["{F}", "is a file"]),
    ("sims.sweep", ["{Gok}", "--out", "{X}", "--max-cells", "0"], ["--max-cells", "'0'", "> 0"]),
    ("sims.sweep", ["{Gok}"], ["--out"]),
    ("sims.launch", ["--processes", "0", "--", "true"], ["--processes", "'0'", "> 0"]),
    ("sims.launch", ["--processes", "2"], ["no command", "after --"]),
    ("sims.launch", ["--", "true"], ["--processes"]),
    ("sims.softmax", ["--steps", "0"], ["--steps", "'0'", "> 0"]),
    ("sims.softmax", ["--pre-lr", "nan"], ["--pre-lr", "'nan'", "> 0"]),
    ("sims.softmax", ["--width", "30", "--heads", "4"], ["width 30", "multiple of heads 4"]),
    ("sims.softmax", ["--max-shots", "10"], ["max_shots", "got 10", ">= n_ft"]),
    ("sims.softmax", ["--method", "zs_k"], ["'zs_k'", "choose from", "'zs_v'"]),
    ("sims.softmax", ["--out", "{F}"], ["{F}", "is a file"]),
    ("sims.softmax", ["--from", "{F}"], ["--from needs --save"]),
    ("sims.softmax", ["--from", "{X}", "--save", "{X}"], ["{X}", "no such file", "allowed"]),
    ("sims.softmax", ["--from", "{F}", "--save", "{X}"], ["{F}", "linattn-softmax-v1"]),
    ("sims.softmax", ["--shots", "0,50"], ["shots", "[0, 50]", "0..max_shots = 40"]),
    ("sims.softmax", ["--shots", "0,a"], ["--shots", "'a'", "integers"]),
    ("sims.plot_softmax", ["{X}"], ["{X}", "no results.json", "allowed"]),
]

GRIDS = {  # name -> grid file text for the sims.sweep cases
    "ok": 'methods = ["zs_all"]\nseeds = [0, 1]\n[axes]\nn_ft = [5, 10]\n',
    "axis": 'methods = ["zs_all"]\nseeds = [0]\n[axes]\ndd = [3]\n',
    "empty": 'methods = ["zs_all"]\nseeds = [0]\n[axes]\nn_ft = []\n',
    "type": 'methods = ["zs_all"]\nseeds = [0]\n[axes]\nn_ft = ["5"]\n',
    "float": 'methods = ["zs_all"]\nseeds = [0]\n[axes]\nnoise = [0.1, "high"]\n',
    "method": 'methods = ["zs_bogus"]\nseeds = [0]\n[axes]\nn_ft = [5]\n',
    "key": 'methods = ["zs_all"]\nseeds = [0]\naxis = 1\n[axes]\nn_ft = [5]\n',
    "cell": 'methods = ["zs_all"]\nseeds = [0]\n[fixed]\nmax_shots = 6\nm = 4\n[axes]\nn_ft = [8]\n',
    "shots": 'methods = ["zs_all"]\nseeds = [0]\n[axes]\nn_ft = [5]\n[outputs]\nshots = [0, 50]\n',
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{P}: the pretraining optimum as a parameter file; {F}: a plain file; {X}: a missing path."""
    from theory.optimal import main as optimal

    d = tmp_path_factory.mktemp("cli_inputs")
    assert optimal(["--method", "pretrain", "--out", str(d / "P.json")]) == 0
    (d / "plain.txt").write_text("not a folder, not JSON")
    grids = {}
    for name, text in GRIDS.items():
        (d / f"grid_{name}.toml").write_text(text)
        grids[f"{{G{name}}}"] = str(d / f"grid_{name}.toml")
    return {"{P}": str(d / "P.json"), "{F}": str(d / "plain.txt"), "{X}": str(d / "missing"), **grids}


def call(module: str, argv: list[str]) -> int:
    """main(argv) of a CLI module; its exit status whether it returns or raises SystemExit."""
    try:
        return importlib.import_module(module).main(argv)
    except SystemExit as err:
        return err.code


def _fill(items, files):
    out = []
    for s in items:
        for k, v in files.items():
            s = s.replace(k, v)
        out.append(s)
    return out


def test_table_has_at_least_30_cases_over_every_cli():
    assert len(CASES) >= 30
    assert {m for m, _, _ in CASES} == set(MODULES)


@pytest.mark.parametrize("module,argv,expect", CASES, ids=[f"{m}:{' '.join(a) or '(none)'}" for m, a, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(module, argv, expect, files, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)

    def no_work(*a, **k):
        raise AssertionError(f"{module} started training on bad input {argv}")

    monkeypatch.setattr("linattn.train.train_plan", no_work)
    monkeypatch.setattr("sims.forgetting.run_study", no_work)
    before = {p: p.stat().st_mtime_ns for p in Path(files["{P}"]).parent.iterdir()}
    code = call(module, _fill(argv, files))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert err, "no message on stderr"
    line = err[0]
    assert line.startswith(f"python -m {module}: error: "), line
    assert len(err) == 1, f"more than one line: {err}"
    for want in _fill(expect, files):
        assert want in line, f"{want!r} not in {line!r}"
    assert not list(work.iterdir()), f"wrote {list(work.iterdir())}"
    assert not Path(files["{X}"]).exists()
    assert {p: p.stat().st_mtime_ns for p in Path(files["{P}"]).parent.iterdir()} == before


def test_a_folder_holding_another_config_is_refused_untouched(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = S.PRESETS["quick"]
    (out / "config.json").write_text(json.dumps({"config": cfg.to_json()}))
    before = (out / "config.json").read_text()
    monkeypatch.setattr("sims.forgetting.run_study", lambda *a, **k: pytest.fail("work started"))
    assert call("sims.forgetting", ["--quick", "--batch", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config" in err[0] and "batch" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == before


@pytest.mark.parametrize("module", MODULES)
def test_help_exits_0_and_shows_defaults(module, capsys):
    assert call(module, ["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: " in text and ("default" in text or module == "sims.plot")


def test_forgetting_help_shows_both_presets_and_the_method_names(capsys):
    assert call("sims.forgetting", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    quick, full = S.PRESETS["quick"], S.PRESETS["full"]
    assert f"pretraining steps; default {quick.train.steps} (--quick), {full.train.steps} (--full)" in text
    assert f"default {quick.seeds} (--quick), {full.seeds} (--full)" in text
    assert "neither preset is given" in text  # --quick is the default preset
    for m in S.METHODS:
        assert m.name in text


def test_theory_risk_help_shows_defaults_and_random_tasks(capsys):
    assert call("theory.risk", ["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.1)" in text and "(default: random)" in text and "(default: 0,1,2,5,10,20,40)" in text


def test_theory_risk_random_is_the_sphere(files, capsys):
    """'random' (the objectives' name for pretraining tasks) and 'sphere' are the same task distribution."""
    out = []
    for task in ("random", "sphere"):
        assert call("theory.risk", ["--params", files["{P}"], "--shots", "0,20", "--task", task]) == 0
        out.append(json.loads(capsys.readouterr().out)["risk"])
    assert out[0] == out[1]


def test_theory_optimal_says_what_it_wrote(files, tmp_path, capsys):
    target = tmp_path / "FT.json"
    args = ["--method", "zs_all", "--theta=0.6,0.8,0,0,0", "--params", files["{P}"], "--k00", "2.0", "--out", str(target)]
    assert call("theory.optimal", args) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"python -m theory.optimal: wrote {target}") and "KQ[0,0] = 2" in err
    assert "g*w = 0," in err or "g*w = 0 " in err or err.endswith("g*w = 0") or "g*w = 0;" in err
    written = json.loads(target.read_text())
    assert written["format"] == "linattn-params-v1"
    entries = np.abs(np.asarray(written["KQ"] + written["V"], dtype=float)).ravel()
    assert np.all((entries == 0) | (entries > 1e-12)) and np.sum(entries == 0) > 0  # zeros printed as 0, not 1e-16


def test_forgetting_refuses_to_run_as_one_of_several_processes(tmp_path, monkeypatch, capsys):
    """Under sims.launch every process would run the whole study into one folder: refused, exit 2."""
    monkeypatch.chdir(tmp_path)
    for k, v in {"LINATTN_COORDINATOR": "127.0.0.1:1", "LINATTN_NUM_PROCESSES": "2", "LINATTN_PROCESS_ID": "0"}.items():
        monkeypatch.setenv(k, v)
    assert call("sims.forgetting", ["--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sims.sweep" in err[0] and "one process" in err[0], err
    assert not list(tmp_path.iterdir())

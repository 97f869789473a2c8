"""`sparsedge calibrate` and `sparsedge eval --recipe` on a tiny model folder."""

from __future__ import annotations

import json

import pytest

from sparsedge.cli import main
from tiny import save_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder("llama", tmp_path_factory.mktemp("cal") / "llama")


SMALL = ["--calib-tokens", "512", "--eval-tokens", "512"]


def test_calibrate_then_eval(folder, tmp_path, capsys):
    rec = tmp_path / "r.json"
    assert main(["calibrate", str(folder), "--method", "chess", "--sparsity", "0.5", "--chunk-size", "16",
                 "-o", str(rec), "--json", *SMALL]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "chess" and out["sites"] == ["gate_act", "q_in", "o_in"]
    assert {"ppl_dense", "ppl", "achieved_sparsity", "top1_agreement", "cls"} <= set(out)
    saved = json.loads(rec.read_text())
    assert saved["results"]["ppl"] == out["ppl"] and saved["chunks"]["size"] == 16
    assert saved["calibration"]["sparse_aware"] and saved["calibration"]["seconds"] == out["calibration_s"]
    # the same protocol as calibrate's held-out measurement gives the same figures
    assert main(["eval", str(folder), "--recipe", str(rec), "--max-tokens", "512", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["cls"]) == {"1", "2", "4", "8"} and 0 < ev["top1_agreement"] <= 1
    for key in ("ppl", "ppl_dense", "achieved_sparsity", "top1_agreement"):
        assert ev[key] == pytest.approx(out[key], rel=1e-6), key


def test_calibrate_dense_thresholds_only(folder, tmp_path, capsys):
    """--no-sparse-aware keeps the dense-pass thresholds: the recipe says so, and they differ from
    the default's, which were set with earlier sites sparsified."""
    recs = {}
    for flag in ([], ["--no-sparse-aware"]):
        rec = tmp_path / f"r{len(flag)}.json"
        assert main(["calibrate", str(folder), "--method", "teal", "--sparsity", "0.7", "-o", str(rec),
                     "--no-eval", *flag, *SMALL]) == 0
        recs[bool(flag)] = json.loads(rec.read_text())
    capsys.readouterr()
    assert recs[False]["calibration"]["sparse_aware"] and not recs[True]["calibration"]["sparse_aware"]
    dense, aware = recs[True]["sites"], recs[False]["sites"]
    # the first site of layer 0 runs before any sparsity, on the same sampled rows
    assert dense["qkv_in"]["thresholds"][0] == pytest.approx(aware["qkv_in"]["thresholds"][0], rel=1e-6)
    assert dense["down_in"]["thresholds"][-1] != pytest.approx(aware["down_in"]["thresholds"][-1], rel=1e-3)


@pytest.mark.parametrize("argv, msg, code", [
    (["--method", "teal", "--sparsity", "1.5"], "strictly between 0 and 1", 1),
    (["--method", "teal", "--sparsity", "0"], "strictly between 0 and 1", 1),
    (["--method", "relu", "--sparsity", "0.5"], "invalid choice: 'relu'", 2),
    (["--method", "cats", "--sparsity", "0.5", "--scope", "qkv_in"], "does not cover qkv_in", 1),
    (["--method", "teal", "--sparsity", "0.5", "--chunk-size", "7"], "does not divide", 1),
    (["--method", "teal", "--sparsity", "0.5", "--calib-file", "/nope.txt"], "no such text file", 1),
])
def test_calibrate_bad_input(folder, tmp_path, capsys, argv, msg, code):
    args = ["calibrate", str(folder), "-o", str(tmp_path / "r.json"), "--no-eval", *SMALL, *argv]
    if code == 2:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    else:
        assert main(args) == 1
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()


def test_eval_recipe_for_another_model(folder, tmp_path, capsys):
    rec = tmp_path / "r.json"
    assert main(["calibrate", str(folder), "--method", "cats", "--sparsity", "0.5", "-o", str(rec),
                 "--no-eval", *SMALL]) == 0
    other = save_folder("gemma3", tmp_path / "g")
    capsys.readouterr()
    assert main(["eval", str(other), "--recipe", str(rec), "--window", "64", "--max-tokens", "128"]) == 1
    assert "another model" in capsys.readouterr().err

"""The command line: JSON shapes, one-line errors, and the real default model end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsedge.cli import NOT_YET, main
from tiny import save_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_folder("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_json(capsys, tiny_folder):
    code, out, _ = _run(capsys, "run", str(tiny_folder), "-p", "def f(x):", "-n", "12", "--json")
    assert code == 0
    obj = json.loads(out)
    assert {"text", "tokens", "new_tokens", "tokens_per_s", "runtime"} <= set(obj)
    assert obj["new_tokens"] == len(obj["tokens"]) <= 12 and obj["runtime"] == "torch"


def test_run_chat_and_sampling(capsys, tiny_folder):
    args = ("run", str(tiny_folder), "--chat", "-p", "hi", "-n", "8", "--temperature", "0.8",
            "--seed", "3", "--json")
    a = json.loads(_run(capsys, *args)[1])
    b = json.loads(_run(capsys, *args)[1])
    assert a["tokens"] == b["tokens"]


def test_eval_json(capsys, tiny_folder):
    code, out, _ = _run(capsys, "eval", str(tiny_folder), "--window", "64", "--max-tokens", "128", "--json")
    obj = json.loads(out)
    assert code == 0 and {"ppl", "eval_tokens", "corpus"} <= set(obj)
    assert obj["eval_tokens"] == 126 and obj["corpus"] == "pydoc-topics:eval" and obj["ppl"] > 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "no-such-model", "-p", "x"], "unknown model 'no-such-model'"),
        (["run", "./missing/folder", "-p", "x"], "no such file or folder"),
        (["eval", "x.gguf"], "no such file or folder"),
        (["eval", "--text-file", "/nonexistent.txt"], "no such text file"),
        (["run", "-p", "x", "--runtime", "warp"], "unknown runtime 'warp'"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message, tiny_folder):
    if argv[0] == "eval" and argv[1] == "--text-file":
        argv = ["eval", str(tiny_folder)] + argv[1:]
    if "--runtime" in argv:
        argv = [argv[0], str(tiny_folder)] + argv[1:]
    code, out, err = _run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("sparsedge: error:")


def test_not_yet_commands_fail_without_output(capsys):
    for name in NOT_YET:
        code, out, err = _run(capsys, name, "x")
        assert code == 1 and out == "" and "not yet available" in err


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--prompt" in err


@pytest.mark.slow
def test_chat_answer_mentions_paris(real_model):
    """The demo's question, through the installed console script, on the real default model."""
    exe = os.path.join(os.path.dirname(sys.executable), "sparsedge")
    r = subprocess.run([exe, "run", "--chat", "-p", "What is the capital of France?", "-n", "32",
                        "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert "Paris" in obj["text"] and obj["tokens_per_s"] > 0


@pytest.mark.slow
def test_eval_is_reproducible(real_model):
    exe = os.path.join(os.path.dirname(sys.executable), "sparsedge")
    cmd = [exe, "eval", "--max-tokens", "1024", "--json"]
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]
    assert runs[0]["ppl"] == runs[1]["ppl"] and runs[0]["eval_tokens"] == 1022
    assert 5 < runs[0]["ppl"] < 40

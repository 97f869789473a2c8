"""sparsedge bench on a tiny random model: report structure, files and plots, figures that agree
with each other and with `sparsedge eval`, lossless speculative rows, GenAI as a peer in worker
processes, bad input; and one end-to-end `bench --quick` on the real default model (slow).
Nothing here checks a speed: only that the figures exist, are finite and consistent."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from sparsedge import SparsedgeError
from sparsedge.bench import BenchConfig, bench
from sparsedge.cli import main
from needs import need
from tiny import save_folder

PNG = b"\x89PNG\r\n\x1a\n"
DECODES = ("greedy", "spec:ngram", "tree:ngram,recycle")


def _small(**over) -> BenchConfig:
    base = dict(recipes=("teal:0.5",), decodes=DECODES, prompts=2, max_new_tokens=40, repeats=2,
                warmup_tokens=4, ppl_tokens=512, ppl_window=128, threads=1, gguf_quant="f32", onnx_quant="fp32",
                calib_tokens=1024, isolate=False)
    return BenchConfig(**{**base, **over})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # varied greedy text (init_range 0.3), so that drafters have something to accept
    return str(save_folder("llama", tmp_path_factory.mktemp("bench") / "hf", init_range=0.3))


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    need("llama_cpp")
    out = tmp_path_factory.mktemp("report")
    cfg = _small(runtimes=("native", "llamacpp", "onnxruntime"))
    return out, bench(tiny_model, out, cfg, progress=False), cfg


def test_report_files_and_plots(run):
    out, report, _ = run
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    for name in ("tokens_per_s.png", "speedup_vs_ppl.png", "acceptance.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    md = (out / "report.md").read_text()
    for c in report["configs"]:  # one table row per configuration
        assert f"| {c['runtime']} | {c['variant']} | {c['quant'] or '-'} | {c['decode']}" in md
    assert "tokens_per_s.png" in md and "Peak memory:" in md
    assert report["errors"] == []
    # the host line names the kernels of the llama.cpp peer (its system-info line)
    assert "AVX2 = 1" in report["host"]["llamacpp_system_info"] or "NEON" in report["host"]["llamacpp_system_info"]
    assert "llama.cpp kernels: " in md


def test_every_configuration_is_measured(run):
    _, report, cfg = run
    got = {(c["runtime"], c["variant"], c["decode"]) for c in report["configs"]}
    # recipes run on the runtimes that apply them; llama.cpp only dense
    want = {(r, v, d) for r in ("native", "llamacpp", "onnxruntime") for v in ("dense", "teal:0.5") for d in DECODES
            if v == "dense" or r != "llamacpp"}
    assert got == want
    assert report["settings"]["prompt_ids"] and len(report["settings"]["prompt_tokens"]) == cfg.prompts
    assert report["host"]["logical_cores"] >= 1 and report["host"]["cpu"]
    assert report["versions"]["sparsedge"] and report["versions"]["numpy"]
    assert report["settings"]["repeats"] == cfg.repeats and report["settings"]["threads_used"] == 1


def test_figures_are_sane_and_consistent(run):
    _, report, cfg = run
    for c in report["configs"]:
        assert len(c["repeats"]) == cfg.repeats
        assert c["decode_tok_s_min"] <= c["decode_tok_s"] <= c["decode_tok_s_max"]
        assert min(c["repeats"]) == c["decode_tok_s_min"] and max(c["repeats"]) == c["decode_tok_s_max"]
        for k in ("decode_tok_s", "prefill_tok_s", "ttft_ms", "peak_rss_mb"):
            assert math.isfinite(c[k]) and c[k] > 0, (k, c)
        if c["decode"] == "greedy":
            assert c["speedup"] == (1.0 if c["variant"] == "dense" else c["speedup"])
        if c["runtime"] == "llamacpp" and c["variant"] == "dense" and c["decode"] == "greedy":
            assert c["vs_llamacpp"] == 1.0


def test_host_bandwidth_is_probed_around_every_job_process(run):
    out, report, cfg = run
    p = report["host_probe"]
    # one probe before the first job, one after each job run: the reference once (perplexity
    # only, not repeated), every other runtime x variant once per round
    assert p["probes"] == 1 + 1 + len(report["runs"]) * cfg.repeats
    assert 0 < p["gbps_min"] <= p["gbps_median"] <= p["gbps_max"] < 1e4
    assert p["cpu_steal"] is None or 0.0 <= p["cpu_steal"] < 1.0
    for u in report["runs"]:  # a job's figure: the mean of the probes before and after it, per round
        assert len(u["host_gbps_rounds"]) == cfg.repeats
        assert all(p["gbps_min"] <= g <= p["gbps_max"] for g in u["host_gbps_rounds"])
        assert u["host_gbps"] == pytest.approx(statistics.median(u["host_gbps_rounds"]))
    assert all(c["host_gbps"] for c in report["configs"])
    assert "Host state during the run: memory bandwidth" in (out / "report.md").read_text()


def test_bandwidth_probe_and_steal_share():
    from sparsedge.bench.host import BandwidthProbe, steal_fraction

    probe = BandwidthProbe(mib=8, seconds=0.05)
    a, b = probe.measure(), probe.measure()
    assert probe.samples == [a, b] and 0.05 < a < 1e4
    s = probe.summary()
    assert s["probes"] == 2 and s["gbps_min"] == min(a, b) and "8 MiB" in s["method"]
    # user nice system idle iowait irq softirq steal (guest...): 20 of 100 ticks stolen
    assert steal_fraction([1, 0, 1, 1, 0, 0, 0, 5, 9], [11, 0, 11, 61, 0, 0, 0, 25, 9]) == pytest.approx(0.2)
    assert steal_fraction(None, [1] * 8) is None and steal_fraction([0] * 8, [0] * 8) is None


def test_bench_compare_flags_differences_and_the_host_state(run, tmp_path, capsys):
    import copy
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_compare", Path(__file__).parents[2] / "benchmarks" / "bench_compare.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    out, report, _ = run
    slower = copy.deepcopy(report)
    for c in slower["configs"]:
        if c["runtime"] == "native":
            c["decode_tok_s"] *= 0.85  # native 15% slower in the "rerun"
    slower["host_probe"]["gbps_median"] *= 0.8
    (tmp_path / "b.json").write_text(json.dumps(slower))
    a = str(out / "report.json")
    assert bc.main([a, a]) == 0
    assert "widest of all: 0.0%" in capsys.readouterr().out
    assert bc.main([a, str(tmp_path / "b.json")]) == 1
    printed = capsys.readouterr().out
    assert "widest decode_tok_s: 15.0% (native" in printed  # |b - a| / a
    assert "host memory bandwidth between jobs (median)" in printed and "(-20.0%)" in printed
    assert bc.main([a, str(tmp_path / "b.json"), "--limit", "0.2"]) == 0


def test_speculative_rows_are_lossless_with_consistent_acceptance(run):
    _, report, cfg = run
    spec = [c for c in report["configs"] if c["drafter"]]
    assert len(spec) == 10
    accepted_somewhere = False
    for c in spec:
        assert c["identical"] and c["identical_prompts"] == c["prompts"] == cfg.prompts, c
        assert 1.0 <= c["mean_accepted"] <= cfg.budget + 1 and 0.0 <= c["acceptance_rate"] <= 1.0
        # tokens per step x steps = what the verification steps produced: every token but each
        # prompt's first (from the prefill), plus at most a budget's worth cut off at the end
        produced = round(c["mean_accepted"] * c["steps"])
        assert cfg.prompts * (cfg.max_new_tokens - 1) <= produced <= cfg.prompts * (cfg.max_new_tokens - 1 + cfg.budget)
        assert c["cost_curve"]["1"] == 1.0
        accepted_somewhere |= c["mean_accepted"] > 1.0
        if c["runtime"] == "llamacpp":  # inexact tree rows: chains only
            assert c["mode"] == "spec"
    assert accepted_somewhere


def test_perplexity_matches_eval_and_top1_is_against_dense(run, tiny_model, capsys):
    out, report, cfg = run
    runs = {(u["runtime"], u["variant"]): u for u in report["runs"]}
    dense_art = report["artifacts"]["dense"]["path"]
    for rt in ("native", "onnxruntime"):
        assert main(["eval", dense_art, "--runtime", rt, "--max-tokens", str(cfg.ppl_tokens),
                     "--window", str(cfg.ppl_window), "--threads", "1", "--json"]) == 0
        ev = json.loads(capsys.readouterr().out)
        assert runs[(rt, "dense")]["ppl"] == pytest.approx(ev["ppl"], abs=1e-4)
        assert runs[(rt, "dense")]["top1_vs_dense"] == 1.0 and runs[(rt, "dense")]["ppl_vs_dense"] == 1.0
        sparse = runs[(rt, "teal:0.5")]
        assert sparse["top1_vs_dense"] < 1.0 and sparse["ppl"] != runs[(rt, "dense")]["ppl"]
        assert sparse["ppl_vs_dense"] == pytest.approx(sparse["ppl"] / runs[(rt, "dense")]["ppl"])
    # the reference is `sparsedge eval MODEL` (torch, fp32)
    assert main(["eval", tiny_model, "--max-tokens", str(cfg.ppl_tokens), "--window", str(cfg.ppl_window),
                 "--json"]) == 0
    assert report["reference"]["ppl"] == pytest.approx(json.loads(capsys.readouterr().out)["ppl"], abs=1e-4)
    # f32 GGUF / fp32 ONNX of the same weights: top-1 equals the reference's nearly everywhere
    assert runs[("native", "dense")]["top1_vs_reference"] > 0.98


def test_artifact_input_in_worker_processes_with_genai_peer(run, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    out, first, _ = run
    art = first["artifacts"]["dense"]["path"]
    cfg = _small(runtimes=("native", "genai"), recipes=(), decodes=("greedy", "spec:ngram"), repeats=1,
                 isolate=True, work_dir=str(tmp_path / "work"))
    report = bench(art, tmp_path / "r2", cfg, progress=False)
    assert report["errors"] == []
    got = {(c["runtime"], c["decode"]) for c in report["configs"]}
    assert got == {("native", "greedy"), ("native", "spec:ngram"), ("genai", "greedy")}
    assert report["memory_method"].startswith("peak resident set size") and "fresh process" in report["memory_method"]
    runs = {u["runtime"]: u for u in report["runs"]}
    # GenAI's fp32 build of the same source weights: same perplexity protocol, nearly the same figure
    assert runs["genai"]["ppl"] == pytest.approx(runs["native"]["ppl"], rel=1e-3)
    assert runs["native"]["ppl"] == pytest.approx(
        {(u["runtime"], u["variant"]): u for u in first["runs"]}[("native", "dense")]["ppl"], abs=1e-6)
    assert all((tmp_path / "work" / "logs" / f).exists() for f in ("native_dense.log", "genai_dense.log"))


def test_cli_json_prints_one_report(run, tiny_model, tmp_path, capsys):
    out, first, _ = run
    work = str(out / "artifacts")  # reuse the exported artifacts
    assert main(["bench", tiny_model, "-o", str(tmp_path / "cli"), "--runtimes", "native", "--decode", "greedy",
                 "spec:ngram", "--prompts", "1", "-n", "6", "--repeats", "1", "--ppl-tokens", "0", "--threads", "1",
                 "--gguf-quant", "f32", "--onnx-quant", "fp32", "--work-dir", work, "--in-process", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [c["decode"] for c in report["configs"]] == ["greedy", "spec:ngram"]
    assert report["artifacts"]["dense"]["reused"] and report["reference"] is None
    assert report["configs"][0]["ppl"] is None and "n/a" in (tmp_path / "cli" / "report.md").read_text()


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    """A model that came as a GGUF file, benched on two GGUF types with a draft model: the
    Qwen pair's preset in miniature."""
    need("llama_cpp")
    from sparsedge import load
    from sparsedge.export.gguf import write_gguf

    d = tmp_path_factory.mktemp("own")
    folder = save_folder("qwen2", d / "hf", init_range=0.3)
    write_gguf(load(str(folder), progress=False), d / "own.gguf", quant="q8_0", progress=False)
    decodes = ("greedy", f"tree:model:{folder}", f"tree:model:{folder},ngram")
    cfg = _small(runtimes=("native", "llamacpp"), recipes=(), decodes=decodes, gguf_quant="f32,q8_0",
                 ppl_tokens=256, prompts=2, max_new_tokens=24)
    return bench(str(d / "own.gguf"), d / "report", cfg, progress=False), cfg, d / "report"


def test_several_gguf_types_and_the_models_own_file(gguf_run):
    report, cfg, out = gguf_run
    assert report["errors"] == []
    got = {(c["runtime"], c["quant"], c["decode"]) for c in report["configs"]}
    spec = {d for d in cfg.decodes if d != "greedy"}
    # the first type runs every decoding, the second dense greedy, the model's own file greedy on llama.cpp
    assert got == ({(r, "f32", d) for r in ("native", "llamacpp") for d in cfg.decodes}
                   | {("native", "q8_0", "greedy"), ("llamacpp", "q8_0", "greedy"), ("llamacpp", "file:Q8_0", "greedy")})
    assert len(spec) == 2
    by = {(c["runtime"], c["quant"], c["decode"]): c for c in report["configs"]}
    own = by[("llamacpp", "file:Q8_0", "greedy")]
    assert own["vs_llamacpp_file"] == 1.0 and report["artifacts"]["file"]["path"].endswith("own.gguf")
    for q in ("f32", "q8_0"):  # speedups within a type; x llama.cpp against the same type
        nat = by[("native", q, "greedy")]
        assert nat["speedup"] == 1.0
        assert nat["vs_llamacpp"] == pytest.approx(nat["decode_tok_s"] / by[("llamacpp", q, "greedy")]["decode_tok_s"])
        assert nat["vs_llamacpp_file"] == pytest.approx(nat["decode_tok_s"] / own["decode_tok_s"])
    # our Q8_0 of the same weights reads like the file's own Q8_0 (same quantizer, same protocol)
    runs = {(u["runtime"], u["quant"]): u for u in report["runs"]}
    assert runs[("llamacpp", "file:Q8_0")]["ppl"] == pytest.approx(runs[("llamacpp", "q8_0")]["ppl"], rel=1e-3)
    md = (out / "report.md").read_text()
    assert "× llama.cpp file" in md and "| llamacpp | dense | file:Q8_0 | greedy |" in md


def test_target_cost_curve_and_where_a_step_goes(gguf_run):
    report, cfg, out = gguf_run
    for u in report["runs"]:
        tc = u["target_cost"]
        assert sorted(map(int, tc["curve"])) == list(range(1, 17)) and tc["curve"]["1"] == 1.0
        assert tc["t1_ms"] > 0 and all(v > 0 for v in tc["curve"].values())
    for c in report["configs"]:
        if not c["drafter"]:
            continue
        assert c["identical"], c  # a draft model (here the target's own weights) is lossless
        assert c["draft_forwards"] > 0 and 0.0 < c["draft_share"] < 1.0
        assert c["draft_ms_step"] > 0 and c["verify_ms_step"] > 0
        assert c["draft_share"] == pytest.approx(c["draft_s"] / (c["draft_s"] + c["verify_s"]), rel=0.5)
        # one draft forward over the target's t(1): the draft is the same model, so near 1
        assert 0.2 < c["draft_forward_vs_t1"] < 10
    md = (out / "report.md").read_text()
    assert "## Target cost curves" in md and "| k=16 |" in md and "draft share" in md


def test_builtin_bench_presets_and_gguf_types():
    cfg = BenchConfig.for_model("qwen2.5-coder-1.5b", repeats=2)
    assert cfg.gguf_quants == ("q4_0", "q8_0") and cfg.repeats == 2
    assert "tree:model:qwen2.5-coder-0.5b" in cfg.decodes and "tree:model:qwen2.5-coder-0.5b,ngram" in cfg.decodes
    assert BenchConfig.for_model("qwen2.5-coder-1.5b", gguf_quant="q8_0").gguf_quants == ("q8_0",)  # given wins
    assert BenchConfig.for_model("smollm2-135m") == BenchConfig()
    with pytest.raises(SparsedgeError, match="unknown GGUF quant type 'q9'"):
        BenchConfig(gguf_quant="q4_0,q9")
    with pytest.raises(SparsedgeError, match="at least one GGUF type"):
        BenchConfig(gguf_quant=" , ")


def test_summarize_takes_medians_prompt_by_prompt():
    """A burst that slows one prompt of one repeat does not move the figures; a slow repeat
    shows in min / max. Decode tok/s = tokens over the sum of the prompts' median times."""
    from sparsedge.bench.measure import SuiteRun, summarize
    from sparsedge.runtimes.decoding import GenerationStats

    def rep(times):
        run = SuiteRun()
        for j, t in enumerate(times):
            st = GenerationStats(prompt_tokens=10, new_tokens=11, prefill_s=0.1, decode_s=t)
            run.add(st, [j] * 11)
        return run.figures()

    base = [0.10, 0.20, 0.30]  # three prompts, 10 decoded tokens each
    reps = [rep(base), rep(base), rep([0.10, 0.20, 3.0]), rep([0.5, 0.20, 0.30]), rep(base)]
    f = summarize(reps)
    assert f["decode_tok_s"] == pytest.approx(30 / 0.6)
    assert f["prefill_tok_s"] == pytest.approx(30 / 0.3) and f["ttft_ms"] == pytest.approx(100.0)
    assert f["decode_tok_s_min"] == pytest.approx(30 / 3.3) and f["decode_tok_s_max"] == pytest.approx(30 / 0.6)
    # bursts in three repeats, each on another prompt: the median of the repeats' own figures
    # falls to a slowed one (30 / 3.3 tok/s); prompt by prompt, each burst is one of five
    reps = [rep(base), rep([3.0, 0.2, 0.3]), rep([0.1, 3.0, 0.3]), rep([0.1, 0.2, 3.0]), rep(base)]
    assert sorted(r["decode_tok_s"] for r in reps)[2] == pytest.approx(30 / 3.3)
    assert summarize(reps)["decode_tok_s"] == pytest.approx(30 / 0.6)


@pytest.mark.parametrize("over, msg", [
    (dict(runtimes=("nope",)), "unknown runtime 'nope'"),
    (dict(recipes=("missing/recipe.json",)), "no such recipe file"),
    (dict(recipes=("teal:1.5",)), "sparsity"),
    (dict(recipes=("nosuch:0.5",)), "nosuch"),
])
def test_bad_input_fails_before_any_work(tiny_model, tmp_path, over, msg):
    with pytest.raises(SparsedgeError, match=msg):
        bench(tiny_model, tmp_path / "o", _small(**over), progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("decode, msg", [("spec", "needs a drafter"), ("tree:nosuch", "unknown drafter"),
                                         ("beam", "unknown decoding"), ("greedy:ngram", "takes no drafter")])
def test_bad_decodes(decode, msg):
    with pytest.raises(SparsedgeError, match=msg):
        BenchConfig(decodes=("greedy", decode))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sparsedge: error: no such file or folder") and err.count("\n") == 1
    assert main(["bench", str(tmp_path / "x"), "-o", str(tmp_path / "o"), "--runtimes", "native,cuda"]) == 1
    assert "unknown runtime 'cuda'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    for opt in ("--runtimes", "--recipes", "--decode", "--quick", "--repeats", "--json", "--ppl-tokens", "--warm"):
        assert opt in helptext


def test_a_job_that_dies_on_a_signal_is_reported_as_such():
    """A job process killed inside native code: the report's error names the signal, the native
    lines before the crash and the innermost Python frame (faulthandler), not an empty log."""
    import subprocess
    import sys

    from sparsedge.bench import job_failure

    code = ("import faulthandler, os, signal, sys; faulthandler.enable(); "
            "sys.stderr.write('llama.cpp system info: CPU : AVX2 = 1 |\\nload_tensors: CPU model buffer\\n'); "
            "sys.stderr.flush(); os.kill(os.getpid(), signal.SIGSEGV)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    msg = job_failure(p.returncode, p.stderr)
    assert msg.startswith("died on SIGSEGV (signal 11); last log lines: llama.cpp system info"), msg
    assert "load_tensors: CPU model buffer" in msg and 'File "<string>", line 1' in msg, msg
    assert job_failure(1, "Traceback\nValueError: boom\n") == "ValueError: boom"
    assert job_failure(2, "") == "exited with status 2"


def test_cli_ends_with_the_configurations_that_failed(monkeypatch, tmp_path, capsys):
    """`sparsedge bench` (the last step of make demo) exits non-zero and its last line names every
    configuration missing from the report."""
    import sparsedge.bench as bench_mod

    fake = {"configs": [], "elapsed_s": 1.0, "errors": [
        {"job": "llamacpp/dense", "error": "died on SIGSEGV (signal 11); last log lines: x (log: L)"}]}
    monkeypatch.setattr(bench_mod, "bench", lambda *a, **k: fake)
    assert main(["bench", "m", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "llamacpp/dense failed: died on SIGSEGV (signal 11)" in err[0]
    assert err[-1] == ("sparsedge: error: 1 configuration(s) failed and are missing from the report: "
                       "llamacpp/dense")


# ------------------------------------------------------------------------------ the real default model


@pytest.mark.slow
def test_quick_bench_on_the_default_model(tmp_path, capsys):
    need("llama_cpp")
    # GGUF runtimes only: the ONNX int4 export and its slower runtime would double the time
    assert main(["bench", "smollm2-135m", "--quick", "--runtimes", "native", "llamacpp",
                 "--decode", "greedy", "spec:ngram", "-o", str(tmp_path / "q"), "--threads", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == []
    assert (tmp_path / "q" / "report.md").is_file() and (tmp_path / "q" / "tokens_per_s.png").is_file()
    runs = {u["runtime"]: u for u in report["runs"]}
    assert 12 < report["reference"]["ppl"] < 40  # 1024 held-out tokens, windows of 256
    assert runs["native"]["ppl_vs_reference"] < 1.5 and runs["llamacpp"]["ppl_vs_reference"] < 1.5
    for c in report["configs"]:
        assert c["decode_tok_s"] > 5 and c["peak_rss_mb"] > 50
        if c["drafter"]:
            assert c["identical"] and c["mean_accepted"] >= 1.0

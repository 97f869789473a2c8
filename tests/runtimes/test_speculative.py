"""Speculative and draft-tree decoding: trees and acceptance rules as units, then the whole loop
against plain decoding on every runtime and drafter (lossless greedy), a statistical test of
lossless sampling, long generations, the CLI, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsedge import SparsedgeError, load
from sparsedge.runtimes import open_runtime
from sparsedge.runtimes.decoding import (CostCurve, Draft, GenerationConfig, SamplingConfig, SpecConfig,
                                         SpecStats, Target, generate, make_drafter, prompt_suite,
                                         speculative_generate)
from sparsedge.runtimes.decoding.accept import accept_greedy, accept_sample
from sparsedge.runtimes.decoding.drafters import DraftRequest
from sparsedge.runtimes.decoding.drafters.layerskip import SkipPlan
from sparsedge.runtimes.decoding.tree import choose, template
from sparsedge.text import encode_prompt
from needs import need
from tiny import save_folder

FLAT = CostCurve([1, 16], [1.0, 1.0])  # verification free up to 16 tokens: take every node
LINEAR = CostCurve.linear()


# ----------------------------------------------------------------------------- trees


def _draft() -> Draft:
    d = Draft()
    a = d.add(-1, 5, 0.9)
    d.add(a, 6, 0.5)
    b = d.add(-1, 7, 0.3)
    d.add(b, 8, 0.9)
    assert d.add(-1, 5, 0.2) == a  # a deterministic duplicate merges
    return d


def test_draft_merges_and_path_probabilities():
    d = _draft()
    np.testing.assert_allclose(d.path_probs(), [0.9, 0.45, 0.3, 0.27])
    assert [n.token for n in d.chain().nodes] == [5, 6]
    q = np.full(10, 0.1)
    assert d.add(-1, 5, 0.9, q=q) != 0  # sampled tokens never merge


def test_choose_respects_budget_ancestors_and_cost():
    d = _draft()
    v = choose(42, d, 16, FLAT)
    assert v.tokens.tolist() == [42, 5, 6, 7, 8] and v.parents.tolist() == [-1, 0, 1, 0, 3]
    assert v.depth.tolist() == [0, 1, 2, 1, 2]
    v = choose(42, d, 2, FLAT)  # the two most likely nodes: 5 and its child 6
    assert v.tokens.tolist() == [42, 5, 6]
    # every node costs a full step: no node's probability (< 1) pays for itself
    assert choose(42, d, 16, LINEAR).k == 1
    # n maximises expected tokens per cost: (1 + 0.9) / 1.4 beats (1 + 0.9 + 0.45) / 1.8 ...
    v = choose(42, d, 16, CostCurve([1, 2, 3, 4, 5], [1.0, 1.4, 1.8, 2.2, 2.6]))
    assert v.tokens.tolist() == [42, 5]
    # ... while with cheaper nodes (2.35 / 1.4 > 1.9 / 1.2 and > 2.65 / 1.6) the child joins
    v = choose(42, d, 16, CostCurve([1, 2, 3, 4, 5], [1.0, 1.2, 1.4, 1.6, 1.8]))
    assert v.tokens.tolist() == [42, 5, 6]


def test_templates_are_trees():
    for name in ("chain8", "tree16", "tree32"):
        paths = template(name)
        assert all(p[:-1] in paths for p in paths if len(p) > 1)
    with pytest.raises(SparsedgeError, match="unknown tree template"):
        template("nope")


def test_cost_curve_interpolates_and_is_monotone():
    c = CostCurve([1, 2, 4, 8], [1.0, 1.5, 1.4, 3.0])
    assert c(1) == 1.0 and c(2) == 1.5 and c(4) == 1.5 and c(6) == pytest.approx(2.25)
    assert c(16) == pytest.approx(3.0 + 1.5 / 4 * 8)


# ----------------------------------------------------------------------------- acceptance rules


def _verify_with_logits(d: Draft, rows: dict[int, int], vocab=10):
    v = choose(1, d, 16, FLAT)
    logits = np.zeros((v.k, vocab), dtype=np.float32)
    for r, t in rows.items():
        logits[r, t] = 5.0
    return v, logits


def test_accept_greedy_follows_the_target():
    d = _draft()  # rows: 0 root, 1 tok5, 2 tok6 (child of 5), 3 tok7, 4 tok8 (child of 7)
    v, logits = _verify_with_logits(d, {0: 7, 3: 8, 4: 2})
    assert accept_greedy(v, logits) == ([0, 3, 4], 2)
    v, logits = _verify_with_logits(d, {0: 5, 1: 9})
    assert accept_greedy(v, logits) == ([0, 1], 9)
    v, logits = _verify_with_logits(d, {0: 3})
    assert accept_greedy(v, logits) == ([0], 3)


def test_accept_sample_on_a_point_mass_target():
    """A target that puts all its mass on one token accepts exactly the drafts that match it."""
    d = _draft()
    v, logits = _verify_with_logits(d, {0: 7, 3: 8, 4: 2})
    logits *= 100  # temperature 1 over these logits is a point mass
    rng = np.random.default_rng(0)
    assert accept_sample(v, logits, SamplingConfig(temperature=1.0), rng) == ([0, 3, 4], 2)


# ----------------------------------------------------------------------------- lossless greedy, everywhere

RUNTIMES = ("torch", "onnxruntime", "llamacpp", "native")
DRAFTERS = ("ngram", "recycle", "ngram,recycle", "layerskip", "sparse", "model")


@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    """A tiny llama with varied greedy text, exported as F32 GGUF + fp32 ONNX; a drafting recipe,
    a layer-skip plan, and a second tiny model with the same tokenizer (the model drafter)."""
    from sparsedge import sparsify
    from sparsedge.export.artifact import ExportConfig, export

    d = tmp_path_factory.mktemp("spec")
    loaded = load(str(save_folder("llama", d / "hf", init_range=0.3)), progress=False)
    export(loaded, d / "art", ExportConfig(formats=("gguf", "onnx"), gguf_quants=("f32",),
                                           onnx_quants=("fp32",)), progress=False)
    other = load(str(save_folder("llama", d / "hf2", seed=1, init_range=0.3)), progress=False)
    export(other, d / "draft", ExportConfig(formats=("gguf",), gguf_quants=("f32",)), progress=False)
    recipe = sparsify.calibrate(loaded, "teal", 0.7, config=sparsify.CalibConfig(tokens=1024, window=128, rows=256),
                                progress=False)
    recipe.save(d / "r70.json")
    sparsify.calibrate(loaded, "teal", 0.3, scope="ffn", config=sparsify.CalibConfig(tokens=1024, window=128, rows=256),
                       progress=False).save(d / "r30.json")
    SkipPlan([1], 0.5, 0, loaded.spec.n_layers).save(d / "skip.json")
    art = load(str(d / "art"), progress=False)
    prompts = [encode_prompt(art.tokenizer, p["prompt"], chat=p["chat"]).tolist() for p in prompt_suite()]
    return {"dir": d, "art": art, "prompts": prompts}


def _drafter_spec(name: str, tiny_art) -> str:
    d = tiny_art["dir"]
    return {"layerskip": f"layerskip:{d / 'skip.json'}", "sparse": f"sparse:{d / 'r70.json'}",
            "model": f"model:{d / 'draft'}@torch"}.get(name, name)


@pytest.fixture(scope="module", params=RUNTIMES)
def target(request, tiny_art):
    if request.param == "llamacpp":
        need("llama_cpp")
    rt = open_runtime(tiny_art["art"], request.param, threads=1)
    plain = [list(generate(rt, p, GenerationConfig(max_new_tokens=48))) for p in tiny_art["prompts"]]
    yield Target(rt, tiny_art["art"], request.param, {"threads": 1}), plain
    getattr(rt, "close", lambda: None)()


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_lossless_greedy_on_every_runtime(target, drafter, tiny_art):
    tgt, plain = target
    dr = make_drafter(_drafter_spec(drafter, tiny_art), tgt)
    accepted = 0
    # drafters that run a model cost a forward per draft token: half the suite keeps the test short
    n = len(plain) // 2 if dr.sequential else len(plain)
    for mode in ("tree", "spec"):
        for prompt, want in zip(tiny_art["prompts"][:n], plain[:n]):
            st = SpecStats()
            got = list(speculative_generate(tgt.runtime, prompt, GenerationConfig(max_new_tokens=48), dr,
                                            SpecConfig(mode=mode, budget=12, cost=FLAT), st))
            assert got == want, (mode, prompt[:8])
            accepted += st.accepted
            assert st.steps + st.accepted == len(got) - 1  # every step yields its accepted drafts + 1
    dr.close()
    assert accepted > 0  # the drafter did propose tokens the target took: speculation happened


def test_drafters_learn_acceptance_rates(tiny_art):
    """The rates that size trees come from what verification accepted, per bucket."""
    rt = open_runtime(tiny_art["art"], "torch", threads=1)
    dr = make_drafter("recycle", Target(rt, tiny_art["art"]))
    st = SpecStats()
    for p in tiny_art["prompts"][:4]:
        list(speculative_generate(rt, p, GenerationConfig(max_new_tokens=48), dr, SpecConfig(cost=FLAT), st))
    first = [v for b, v in dr.rates.acc.items() if b[1] == 0]  # depth-0 buckets (prob bin, depth, pair)
    a, t = sum(v[0] for v in first), sum(v[1] for v in first)
    assert t > 10 and 0 < a < t  # successors at depth 0: tried often, accepted sometimes


def test_recycle_pairs_probabilities_and_files(tmp_path):
    """Successors after a token pair win over the token's own row; a node's bucket comes from the
    target's probability of it among the kept top-k; save / load round-trips both matrices."""
    from sparsedge.runtimes.decoding.drafters.recycle import PROB_BINS, RecycleDrafter
    from sparsedge.runtimes.decoding.tree import Node, Verify

    V = 64
    dr = RecycleDrafter(V, k=8, tree="chain8")
    lg = np.zeros((2, V), np.float32)
    lg[0, 7], lg[1, 9] = 12.0, 3.0  # row 0 sure of 7; row 1 unsure of 9
    # verified rows: root 5 (after context token 4), then node 6 below it
    v = Verify(np.array([5, 6]), np.array([-1, 0]), np.array([0, 1]), [Node(6, -1, 0.5, src="ngram")])
    dr.observe(v, lg, [0], 7, [1, 4, 5])
    assert dr.succ[5, 0] == 7 and dr.succ[6, 0] == 9
    assert dr.prob[5, 0] > 0.99 and 0.1 < dr.prob[6, 0] < 0.9
    assert dr._successors(4, 5)[2] and dr._successors(5, 6)[2] and not dr._successors(9, 5)[2]
    # the one-token row of 5 is overwritten after another context; the pair (4, 5) still knows 7
    lg2 = np.zeros((1, V), np.float32)
    lg2[0, 11] = 12.0
    dr.observe(Verify(np.array([5]), np.array([-1]), np.array([0]), []), lg2, [0], 11, [2, 3, 5])
    assert dr.succ[5, 0] == 11
    req = DraftRequest([1, 4, 5], 8, SamplingConfig(), None)
    d = dr.propose(req)
    assert d.nodes[0].token == 7 and d.nodes[0].tag == (PROB_BINS - 1, 0, True)
    d = dr.propose(DraftRequest([9, 5], 8, SamplingConfig(), None))  # a pair never seen: the row
    assert d.nodes[0].token == 11 and d.nodes[0].tag[2] is False
    f = tmp_path / "m.npz"
    dr.save(f)
    other = RecycleDrafter(V, k=8, tree="chain8")
    other.load(f)
    assert (other.succ == dr.succ).all() and (other.prob == dr.prob).all()
    np.save(tmp_path / "bare.npy", dr.succ)  # a bare matrix: probabilities unknown
    other.load(tmp_path / "bare.npy")
    assert (other.succ == dr.succ).all() and not other.prob.any()
    with pytest.raises(SparsedgeError, match="shape"):
        RecycleDrafter(V + 1, k=8, tree="chain8").load(f)
    # the pair table is bounded: 4 slots after 60 stored pairs, the newest one found
    small = RecycleDrafter(V, k=8, tree="chain8", pairs=4)
    for a in range(60):
        small.observe(Verify(np.array([7]), np.array([-1]), np.array([0]), []), lg2, [0], 11, [a % V, 7])
    assert (small.pair_key >= 0).sum() <= 4 and small._successors(59, 7)[2]
    with pytest.raises(SparsedgeError, match="power of two"):
        RecycleDrafter(V, pairs=6)


def test_long_generation_stays_identical(tiny_art):
    """keep() after partial acceptance, a thousand times: the cache never drifts."""
    rt = open_runtime(tiny_art["art"], "native", threads=1)
    prompt = tiny_art["prompts"][0]
    cfg = GenerationConfig(max_new_tokens=1000)
    want = list(generate(rt, prompt, cfg))
    st = SpecStats()
    dr = make_drafter("ngram,recycle", Target(rt, tiny_art["art"], "native"))
    got = list(speculative_generate(rt, prompt, cfg, dr, SpecConfig(cost=FLAT), st))
    assert got == want and st.accepted > 50


# ----------------------------------------------------------------------------- lossless sampling

N_SAMPLES = 1500
ALPHA = 1e-3  # false-alarm rate of each homogeneity test


def _homogeneity_p(a: list[tuple], b: list[tuple]) -> float:
    """Chi-square test that two samples of sequences come from one distribution; categories with
    fewer than 10 draws in both samples together are pooled."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    ca, cb = Counter(a), Counter(b)
    keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 10]
    rest = [len(a) - sum(ca[k] for k in keys), len(b) - sum(cb[k] for k in keys)]
    table = [[ca[k] for k in keys] + [rest[0]], [cb[k] for k in keys] + [rest[1]]]
    return float(chi2_contingency(np.asarray(table)).pvalue)


@pytest.fixture(scope="module")
def sampling_setup(tiny_art):
    rt = open_runtime(tiny_art["art"], "torch", threads=1)
    prompt = tiny_art["prompts"][-1][:12]
    cfg = dict(max_new_tokens=4, temperature=0.7)
    plain = [tuple(generate(rt, prompt, GenerationConfig(**cfg, seed=s))) for s in range(N_SAMPLES)]
    return rt, prompt, cfg, plain


@pytest.mark.parametrize("drafter", ["ngram,recycle", "sparse"])
def test_lossless_sampling_matches_plain_sampling(sampling_setup, tiny_art, drafter):
    """Deterministic trees (recycle) and sampled chains (the target at 30% sparsity: close to the
    target but not equal, so both acceptance and the residual rule are exercised) leave the output
    distribution of 4-token continuations unchanged."""
    rt, prompt, cfg, plain = sampling_setup
    if drafter == "sparse":  # mild sparsity: on this random model 70% leaves 4% overlap with the target
        drafter = f"sparse:{tiny_art['dir'] / 'r30.json'}"
    dr = make_drafter(_drafter_spec(drafter, tiny_art), Target(rt, tiny_art["art"]))
    st = SpecStats()  # accumulates over the runs
    spec = [tuple(speculative_generate(rt, prompt, GenerationConfig(**cfg, seed=10_000 + s), dr,
                                       SpecConfig(cost=FLAT), st)) for s in range(N_SAMPLES)]
    assert st.new_tokens == N_SAMPLES * cfg["max_new_tokens"]
    assert st.accepted > N_SAMPLES // 2 and st.accepted < st.drafted  # accepted often, not always
    assert _homogeneity_p(plain, spec) > ALPHA


def test_the_sampling_test_can_fail(sampling_setup, tiny_art, monkeypatch):
    """The same test catches a biased rule: accepting every deterministic draft outright."""
    from sparsedge.runtimes.decoding import accept

    rt, prompt, cfg, plain = sampling_setup
    real = accept.accept_sample

    def biased(v, logits, c, rng):
        path, nxt = real(v, logits, c, rng)
        kids = v.children()
        while kids[path[-1]]:  # ...and then take the first child all the way down
            path.append(kids[path[-1]][0])
        return path, int(np.argmax(logits[path[-1]]))

    monkeypatch.setattr("sparsedge.runtimes.decoding.speculative.accept_sample", biased)
    dr = make_drafter("recycle", Target(rt, tiny_art["art"]))
    spec = [tuple(speculative_generate(rt, prompt, GenerationConfig(**cfg, seed=20_000 + s), dr,
                                       SpecConfig(cost=FLAT))) for s in range(N_SAMPLES // 3)]
    assert _homogeneity_p(plain, spec) < ALPHA


# ----------------------------------------------------------------------------- CLI and bad input


def test_cli_run_spec_json(tiny_art, capsys):
    from sparsedge.cli import main

    art = str(tiny_art["dir"] / "art")
    assert main(["run", art, "--runtime", "torch", "-p", "def f(x):", "-n", "24", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["run", art, "--runtime", "torch", "-p", "def f(x):", "-n", "24", "--decode", "tree",
                 "--drafter", "ngram,recycle", "--budget", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == plain["tokens"]
    for key in ("steps", "mean_accepted", "acceptance_rate", "draft_s", "verify_s"):
        assert key in out
    assert out["steps"] <= len(out["tokens"]) - 1


@pytest.mark.parametrize("argv,msg", [
    (["--decode", "spec", "--drafter", "nope"], "unknown drafter"),
    (["--decode", "fast"], "invalid choice"),
    (["--decode", "tree", "--drafter", "ngram", "--budget", "0"], "budget"),
    (["--decode", "spec"], "needs --drafter"),
    (["--drafter", "ngram"], "--drafter needs --decode spec or tree"),
    (["--decode", "spec", "--drafter", "sparse"], "needs a recipe"),
    (["--skip", "always"], "--skip applies to --runtime native"),
])
def test_cli_bad_decoding_arguments(tiny_art, capsys, argv, msg):
    from sparsedge.cli import main

    art = str(tiny_art["dir"] / "art")
    try:
        code = main(["run", art, "--runtime", "torch", "-p", "x", "-n", "4", *argv])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code != 0 and msg in capsys.readouterr().err


def test_cli_native_skip_modes_give_one_output(tiny_art, tmp_path, capsys):
    """--skip picks how native runs an artifact's recipe (skipped work or dense kernels on the
    thresholded inputs): every mode generates the same tokens."""
    from sparsedge.cli import main
    from sparsedge.export.artifact import ExportConfig, export
    from sparsedge.sparsify.recipe import SparsityRecipe

    d = tiny_art["dir"]
    art = tmp_path / "sparse"
    export(load(str(d / "hf"), progress=False), art, ExportConfig(formats=("gguf",), gguf_quants=("q8_0",)),
           recipe=SparsityRecipe.load(d / "r70.json"), progress=False)
    outs = {}
    for mode in ("auto", "always", "never"):
        assert main(["run", str(art), "--runtime", "native", "--skip", mode, "-p", "def f(x):", "-n", "12",
                     "--json"]) == 0
        outs[mode] = json.loads(capsys.readouterr().out)["tokens"]
    assert outs["auto"] == outs["always"] == outs["never"] and len(outs["auto"]) == 12


def test_model_drafter_needs_the_same_tokenizer(tiny_art, tmp_path):
    from transformers import AutoTokenizer

    rt = open_runtime(tiny_art["art"], "torch", threads=1)
    folder = save_folder("llama", tmp_path / "other", init_range=0.3)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(["<extra>"])  # one token more: a different vocabulary
    tok.save_pretrained(folder)
    with pytest.raises(SparsedgeError, match="tokenizer differs"):
        make_drafter(f"model:{folder}@torch", Target(rt, tiny_art["art"]))


@pytest.mark.parametrize("runtime", ["native", "onnxruntime"])
def test_model_drafter_by_name_is_exported_once_for_the_targets_runtime(tiny_art, tmp_path, monkeypatch, runtime):
    """model:NAME without @RUNTIME: a model that is not an artifact drafts on the target's runtime,
    exported once in the target's quant into the cache (the second drafter reuses it), and
    speculative output still equals plain greedy."""
    from sparsedge.export import artifact as artifact_mod

    monkeypatch.setenv("SPARSEDGE_HOME", str(tmp_path / "home"))
    exports, real = [], artifact_mod.export
    monkeypatch.setattr(artifact_mod, "export", lambda *a, **k: exports.append(a[2]) or real(*a, **k))
    rt = open_runtime(tiny_art["art"], runtime, threads=1)
    tgt = Target(rt, tiny_art["art"], runtime, {"threads": 1})
    src = tiny_art["dir"] / "hf2"  # an HF folder with the target's tokenizer
    fmt, quant = {"native": ("gguf", "f32"), "onnxruntime": ("onnx", "fp32")}[runtime]  # the target's
    dr = make_drafter(f"model:{src}", tgt)
    assert dr.rt.name == runtime
    (out,) = (tmp_path / "home" / "drafts").iterdir()
    assert f"-{fmt}-{quant}-" in out.name and (out / "manifest.json").is_file()
    assert [c.formats for c in exports] == [(fmt,)]
    make_drafter(f"model:{src}", tgt).close()  # cached: no second export
    assert len(exports) == 1
    prompt = tiny_art["prompts"][0]
    want = list(generate(rt, prompt, GenerationConfig(max_new_tokens=24)))
    got = list(speculative_generate(rt, prompt, GenerationConfig(max_new_tokens=24), dr,
                                    SpecConfig(mode="spec", budget=8, cost=FLAT)))
    assert got == want
    dr.close()


def test_bad_spec_configs():
    with pytest.raises(SparsedgeError, match="unknown decoding mode"):
        SpecConfig(mode="beam")
    with pytest.raises(SparsedgeError, match="budget"):
        SpecConfig(budget=0)
    with pytest.raises(SparsedgeError, match="cost curve"):
        CostCurve([2, 4], [1.0, 2.0])


def test_draft_request_budget_zero_gives_plain_steps(tiny_art):
    rt = open_runtime(tiny_art["art"], "torch", threads=1)
    dr = make_drafter("ngram", Target(rt))
    d = dr.propose(DraftRequest([1, 2, 3, 1, 2], 4, SamplingConfig(), np.random.default_rng(0)))
    assert [n.token for n in d.nodes][:1] == [3]  # "1 2" was followed by 3


def test_layerskip_search_picks_harmless_layers(tiny_art, tmp_path):
    """The search skips layers while the draft keeps agreeing with the full model, never the first
    or last; the plan is saved beside the artifact and reloaded; a plan for another model fails."""
    from sparsedge import data
    from sparsedge.runtimes.decoding.drafters import layerskip

    rt = open_runtime(tiny_art["art"], "torch", threads=1)
    tgt = Target(rt, tiny_art["art"])
    ids = data.tokenize(tiny_art["art"].tokenizer, data.calibration_text()[:3000])[:256]
    plan = layerskip.search(tgt, ids, max_ratio=0.4, min_agreement=0.0, progress=False)
    L = rt.spec.n_layers
    assert len(plan.skip) == int(0.4 * L) and all(0 < i < L - 1 for i in plan.skip)
    # the reported agreement is what that skip set gives, measured again here
    draft = layerskip.torch_view(tgt, skip_layers=plan.skip)
    ref = layerskip._argmax(rt, np.asarray(ids), 256)
    assert plan.agreement == pytest.approx((layerskip._argmax(draft, np.asarray(ids), 256) == ref).mean(), abs=1e-4)
    strict = layerskip.search(tgt, ids, max_ratio=0.4, min_agreement=1.01, progress=False)
    assert strict.skip == []  # nothing can be skipped without losing agreement
    p = plan.save(tmp_path / "plan.json")
    assert layerskip.SkipPlan.load(p, L) == plan
    with pytest.raises(SparsedgeError, match="plan for a"):
        layerskip.SkipPlan.load(p, L + 1)


# ----------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def real_art(real_model, tmp_path_factory):
    """smollm2-135m as Q4_0 + Q8_0 GGUF and int4 ONNX, a TEAL 70% drafting recipe (calibrated on
    4k tokens), a fixed layer-skip plan, and the suite's prompts with their plain greedy outputs."""
    from sparsedge import sparsify
    from sparsedge.export.artifact import ExportConfig, export

    d = tmp_path_factory.mktemp("real_spec")
    export(real_model, d / "art", ExportConfig(formats=("gguf", "onnx"), gguf_quants=("q4_0", "q8_0"),
                                               onnx_quants=("int4",)), progress=False)
    sparsify.calibrate(real_model, "teal", 0.7, config=sparsify.CalibConfig(tokens=4096),
                       progress=False).save(d / "r70.json")
    SkipPlan(list(range(12, 20)), 0.0, 0, real_model.spec.n_layers).save(d / "skip.json")
    art = load(str(d / "art"), progress=False)
    prompts = [encode_prompt(art.tokenizer, p["prompt"], chat=p["chat"]).tolist() for p in prompt_suite()]
    return {"dir": d, "art": art, "prompts": prompts}


# every runtime with the cheap drafters; the model-running drafters on the native engine (the tiny
# tests above run every drafter on every runtime)
REAL_CASES = [("native", "ngram,recycle"), ("llamacpp", "ngram,recycle"), ("onnxruntime", "ngram,recycle"),
              ("native", "sparse"), ("native", "model")]


@pytest.mark.slow
@pytest.mark.parametrize("runtime,drafter", REAL_CASES)
def test_real_model_lossless_greedy_on_the_suite(real_art, runtime, drafter):
    """The whole prompt suite, 128 new tokens each, identical to plain greedy on the same runtime;
    the draft trees are sized by the runtime's measured cost curve, as users run them."""
    if runtime == "llamacpp":
        need("llama_cpp")
    d = real_art["dir"]
    spec = {"sparse": f"sparse:{d / 'r70.json'}", "layerskip": f"layerskip:{d / 'skip.json'}",
            "model": f"model:{d / 'art'}@native"}.get(drafter, drafter)
    opts = {"threads": 2, **({"quant": "q4_0"} if runtime != "onnxruntime" else {})}
    rt = open_runtime(real_art["art"], runtime, **opts)
    dr = make_drafter(spec, Target(rt, real_art["art"], runtime, opts))
    cfg = GenerationConfig(max_new_tokens=128)
    st = SpecStats()
    for prompt in real_art["prompts"]:
        want = list(generate(rt, prompt, cfg))
        assert list(speculative_generate(rt, prompt, cfg, dr, SpecConfig(budget=16), st)) == want
    dr.close()
    getattr(rt, "close", lambda: None)()
    if runtime != "llamacpp":  # llama.cpp's cost curve (t(2) ~ 1.7 t(1)) rightly makes it verify no drafts
        assert st.accepted > 100


@pytest.mark.parametrize("vocab", [8, 200, 1000, 49152])
def test_recycle_top_k_equals_a_full_sort(vocab):
    """The recycle drafter's top-k (bounded by chunk maxima) against sorting every logit: random
    rows, a row whose top entries tie, a row whose top k sit in one chunk, and a constant row."""
    from sparsedge.runtimes.decoding.drafters.recycle import top_k

    rng = np.random.default_rng(vocab)
    x = rng.standard_normal((5, vocab)).astype(np.float32)
    x[1, [3, 5]] = x[1].max() + 1  # tied at the top: index order
    x[2, : min(8, vocab)] += 10  # the whole top k inside the first chunk
    x[3] = 0.5
    k = min(8, vocab)
    got = top_k(x, k)
    for row, g in zip(x, got):
        want = sorted(range(vocab), key=lambda i: (-row[i], i))[:k]
        if row.min() == row.max():  # all equal: any k indices, but distinct and valid
            assert len(set(g.tolist())) == k and g.max() < vocab
        else:
            assert g.tolist() == want

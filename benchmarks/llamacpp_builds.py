"""What the portable llama.cpp build costs against another build, on this host, in one run.

    python benchmarks/llamacpp_builds.py FILE.gguf --build portable= --build native=/tmp/lcp-native \
        [--tokens 128] [--rounds 5] [--threads 2]

Each ``--build NAME=DIR`` is a llama-cpp-python install: DIR is put first on ``sys.path`` of the
child processes (``pip install --no-deps --target DIR WHEEL``); an empty DIR is the one installed in
this environment. The builds take turns round by round, each round a fresh process per build, so
that the host's drift falls on all of them alike. Per build: its system-info line, plain decode
tok/s (``--tokens`` single-token steps after a 32-token prompt) and the verification cost curve
t(k)/t(1) for k = 2, 4, 8, 16; medians over the rounds, and each build's ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from sparsedge.runtimes.llamacpp import compiled_features

KS = (1, 2, 4, 8, 16)

CHILD = r"""
import json, sys, time
import numpy as np
from sparsedge.runtimes.llamacpp import LlamaCppRuntime, system_info
path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = LlamaCppRuntime(path, n_ctx=1024, threads=threads)
rng = np.random.default_rng(0)
prompt = rng.integers(100, 1000, 32)
def decode():
    rt.reset(); rt.forward(prompt); t = time.perf_counter()
    tok = int(prompt[-1])
    for _ in range(tokens):
        tok = int(rt.forward([tok])[-1].argmax())
    return tokens / (time.perf_counter() - t)
decode()  # warm-up
tps = decode()
cost = {}
for k in %s:
    rt.reset(); rt.forward(prompt)
    times = []
    for _ in range(12):
        t = time.perf_counter(); rt.forward(rng.integers(100, 1000, k)); times.append(time.perf_counter() - t)
        rt.truncate(len(prompt))
    cost[k] = float(np.median(times))
print(json.dumps({"system_info": system_info(), "decode_tok_s": tps, "t": cost}))
""" % (KS,)


def _run(site: str, path: str, tokens: int, threads: int) -> dict:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(tokens), str(threads)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llamacpp_builds: the build at {site or '(installed)'} failed: "
                         f"{(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("--build", action="append", required=True, metavar="NAME=DIR",
                    help="a llama-cpp-python install to measure (DIR empty: this environment's)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    builds = [b.partition("=")[::2] for b in a.build]
    runs: dict[str, list[dict]] = {n: [] for n, _ in builds}
    for r in range(a.rounds):
        for name, site in builds:
            runs[name].append(_run(site, a.gguf, a.tokens, a.threads))
            print(f"round {r + 1}/{a.rounds} {name}: {runs[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    first = None
    print("| build | decode tok/s (min-max) | x first | t(k)/t(1), k = 2, 4, 8, 16 | t(8) x first | kernels |")
    print("|---|---|---|---|---|---|")
    for name, _ in builds:
        rr = runs[name]
        tps = statistics.median(x["decode_tok_s"] for x in rr)
        t = {k: statistics.median(x["t"][str(k)] for x in rr) for k in KS}
        first = first or (tps, t)
        info = rr[0]["system_info"]
        feats = compiled_features(info)
        print(f"| {name} | {tps:.1f} ({min(x['decode_tok_s'] for x in rr):.1f}-{max(x['decode_tok_s'] for x in rr):.1f}) "
              f"| {tps / first[0]:.3f} | {', '.join(f'{t[k] / t[1]:.2f}' for k in KS[1:])} | "
              f"{t[8] / first[1][8]:.3f} | {' '.join(feats)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

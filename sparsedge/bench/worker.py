"""One bench job in a process of its own: ``python -m sparsedge.bench.worker JOB.json RESULT.json``.

A fresh process per runtime × variant keeps each peak-memory figure to that runtime alone.
Progress goes to stdout as lines ``progress N`` (the parent's bar counts them); logs to stderr.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import faulthandler

    from .measure import measure_job

    job_path, out_path = argv
    job = json.loads(open(job_path).read())
    # A job that dies in native code leaves its log (this process's stderr) with the Python stack
    # and, for llama.cpp, the native log lines written before the crash; the parent reports both.
    faulthandler.enable()
    if job["runtime"] == "llamacpp":
        from ..runtimes.llamacpp import log_crashes_to_stderr

        log_crashes_to_stderr()

    def progress(n: int) -> None:
        print(f"progress {n}", flush=True)

    result = measure_job(job, progress)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One exception type for everything a user can get wrong.

The CLI prints a SparsedgeError as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class SparsedgeError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model."""


def describe_exit(rc: int) -> str:
    """'died on SIGSEGV (signal 11)' for a child process killed by a signal, else 'exited with
    status N' (subprocess return codes: negative = the signal's number)."""
    import signal

    if rc < 0:
        try:
            return f"died on {signal.Signals(-rc).name} (signal {-rc})"
        except ValueError:
            return f"died on signal {-rc}"
    return f"exited with status {rc}"


def crash_summary(rc: int, log_text: str, n: int = 4) -> str:
    """One line on a child process that died, from its stderr: the signal, the last log lines
    before Python's faulthandler report (the native library's own lines), and the innermost
    Python frame faulthandler names."""
    before, sep, after = log_text.partition("Fatal Python error")
    lines = [x.strip() for x in before.splitlines() if x.strip()]
    out = f"{describe_exit(rc)}; last log lines: {' | '.join(lines[-n:]) or '(none)'}"
    frame = next((x.strip() for x in after.splitlines() if x.strip().startswith("File ")), None)
    return out + (f"; in {frame}" if sep and frame else "")

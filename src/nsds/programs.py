"""Running an external program (llama.cpp's tools, its converter, the build's steps) with its output captured,
and one-line errors: a program that cannot start, does not finish in time, or fails, named with its own last
error line."""

import re
import signal
import subprocess
from pathlib import Path

from nsds.errors import NsdsError, first_line

_CHECKED: set[tuple[str, int, int]] = set()


def check_runs(binary: Path, what: str) -> None:
    """`binary --help` must start and exit 0 or 1 (llama-quantize's usage exits 1): one line if it cannot."""
    try:
        stat = binary.stat()
    except OSError as err:
        raise NsdsError(f"{what} '{binary}' cannot be read: {first_line(err)}") from None
    key = (str(binary), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    result = completed([binary, "--help"], 30, f"{what} '{binary}' does not run", f"{what} '{binary}' --help")
    if result.returncode not in (0, 1):
        raise NsdsError(f"{what} '{binary}' does not run: {failure_reason(result)}")
    _CHECKED.add(key)


_ERROR_WORDS = re.compile(r"error|failed|fail to|cannot|can't|unable|invalid|not found|no such|unknown", re.I)


def failure_reason(result: subprocess.CompletedProcess) -> str:
    """The reason a tool failed, one line: its last error line, else its last output line, with the status."""
    if result.returncode < 0:
        try:
            status = f"killed by {signal.Signals(-result.returncode).name}"
        except ValueError:
            status = f"killed by signal {-result.returncode}"
    else:
        status = f"exit status {result.returncode}"
    reason = meaningful_line(result.stderr) or meaningful_line(result.stdout)
    return f"{reason} ({status})" if reason else status


def meaningful_line(text: str) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines()]
    lines = [line for line in lines if re.search(r"[A-Za-z]", line)]  # no blank, dot-progress or rule lines
    errors = [line for line in lines if _ERROR_WORDS.search(line)]
    chosen = (errors or lines or [None])[-1]
    return None if chosen is None else chosen[:300]


def run_streams(
    path: Path, args: list, what: str, timeout: float | None = None, explain=None
) -> subprocess.CompletedProcess:
    """Run a tool with stdout and stderr kept apart (llama-perplexity's scores go to stdout, its log to stderr).

    A failure names `explain(result)` when it finds the reason, else the tool's last error line, without the
    timestamp and level llama.cpp's log puts before it.
    """
    result = completed([path, *args], timeout, f"cannot run {what} ('{path}')", f"{what} ({path.name})")
    if result.returncode != 0:
        reason = (explain and explain(result)) or failure_reason(result)
        raise NsdsError(f"{what} failed: {strip_log_prefix(reason)}")
    return result


def completed(command: list, timeout: float | None, cannot_start: str, running: str,
              **options) -> subprocess.CompletedProcess:  # fmt: skip
    """`command` run to its end with its output captured as text and no stdin; one NsdsError when it cannot
    start (`cannot_start`, then the reason) or runs past `timeout` seconds (`running` did not finish)."""
    try:
        return subprocess.run([str(part) for part in command], capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL, **options)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise NsdsError(f"{running} did not finish in {timeout:g} s") from None
    except OSError as err:
        raise NsdsError(f"{cannot_start}: {first_line(err)}") from None


def strip_log_prefix(line: str) -> str:
    """A line without llama.cpp's log timestamp and level: `0.00.407.843 E perplexity: ...` -> `perplexity: ...`."""
    return re.sub(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ", "", line)

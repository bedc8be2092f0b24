"""Answer extraction and checking: the last \\boxed{} (or "the answer is X"), checked against the gold with
math-verify (gold first) in worker processes whose timeout is enforced from here, plus a numeric fallback.

math-verify's own timeouts use signals and break outside the main thread, so each check runs in a small
pool of worker processes (fresh interpreters started with subprocess: safe when torch is loaded and, unlike
multiprocessing spawn/forkserver, no re-import of the caller's __main__); a check that overruns `timeout`
seconds has its worker killed and replaced. The pool is created lazily, reused, and stopped at exit.

What runs here in the parent on model text (extraction, the numeric fallback) must take time linear in its
input: no regex with nested or adjacent ambiguous quantifiers, and extraction reads only the last
`MAX_SCAN_CHARS` characters of an output.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from lrs.errors import LRSError

MAX_SCAN_CHARS = (
    16_000  # extraction reads only this many trailing characters of an output (the answer is last)
)

_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
# one way to split the whitespace after "is" (`\s*:?\s*` had many: quadratic on long blank runs)
_ANSWER_IS_RE = re.compile(r"(?:final\s+)?answer\s+is\s*(?::\s*)?([^\n]+)", re.IGNORECASE)
# indentation without newlines: `^\s*` let every line start rescan the blank lines after it
_HASHES_RE = re.compile(r"^[^\S\n]*####\s*([^\n]+)", re.MULTILINE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ---------------------------------------------------------------- extraction


def _closing_braces(text: str) -> dict[int, int]:
    """Position of the closing brace for every "{" that closes (one pass over the braces, so linear)."""
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    return close


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} in `text` (balanced braces), or None."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    close = _closing_braces(text)  # once for all boxes: scanning to the end per unclosed box was quadratic
    for m in reversed(boxes):
        end = close.get(m.end() - 1)
        if end is not None:
            return text[m.end() : end].strip()
    return None


def _rstrip_punct(s: str) -> str:
    """`s` without trailing ".", ";", "," and whitespace (a loop: `[.;,\\s]+$` is quadratic on long runs)."""
    end = len(s)
    while end and (s[end - 1] in ".;," or s[end - 1].isspace()):
        end -= 1
    return s[:end]


def _clean_answer_phrase(s: str) -> str:
    s = s.strip().strip("*").strip()
    s = _rstrip_punct(s)
    if s.startswith("$") and s.endswith("$") and len(s) > 1:
        s = s.strip("$").strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2].strip()
    return s


def extract_answer(text: str, *, last_number: bool = False) -> str | None:
    """The model's final answer: last \\boxed{}, else "the (final) answer is X", else a `#### X` line, else
    (only with `last_number=True`) the last number; None if there is none, so a truncated trace counts wrong.
    Only the last `MAX_SCAN_CHARS` characters are read, so the time taken is bounded whatever the model wrote."""
    if not text:
        return None
    text = text[-MAX_SCAN_CHARS:]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for rx in (_ANSWER_IS_RE, _HASHES_RE):
        hits = rx.findall(text)
        if hits:
            ans = _clean_answer_phrase(hits[-1])
            if ans:
                return ans
    if last_number:
        nums = _NUMBER_RE.findall(text)
        if nums:
            return nums[-1].replace(",", "")
    return None


# ---------------------------------------------------------------- numeric fallback

_TEXT_CMD_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LETTERS = frozenset(string.ascii_letters)
_UNIT_CHARS = frozenset(string.ascii_letters + ".'")


def _strip_unit_words(s: str) -> str:
    """Drop trailing unit words ("18 dollars", "5 sq. ft") in one backward pass.

    Removes exactly what `re.sub(r"(?:\\s*[A-Za-z][A-Za-z.']*)+\\s*$", "", s)` removed: the longest suffix made of
    words of letters, "." and "'" that start with a letter. That regex could split a run of letters into words
    in exponentially many ways (`\\s*` may be empty), and tried them all whenever the text did not end in a word,
    e.g. "the number of apples she has is 5"."""
    cut = None
    end = len(s)
    while True:
        while end and s[end - 1].isspace():
            end -= 1
        start = end
        while start and s[start - 1] in _UNIT_CHARS:
            start -= 1
        first = start  # a word must start with a letter: skip leading "." / "'"
        while first < end and s[first] not in _LETTERS:
            first += 1
        if first == end:  # no word here (e.g. the text ends in a digit)
            break
        cut = first
        if first != start or start == 0 or not s[start - 1].isspace():
            break  # the word is glued to something else ("5x", ".x"): nothing further left can go
        end = start
    if cut is None:
        return s
    while cut and s[cut - 1].isspace():  # the whitespace before the first word goes too
        cut -= 1
    return s[:cut]


def to_number(s: str | None) -> float | None:
    """Reduce a GSM8K-style answer ("$1,000", "18 dollars", "\\$18", "25\\%") to a float, or None."""
    if s is None:
        return None
    s = s.strip()
    for _ in range(3):
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", " ").replace("\\ ", " ")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
    s = re.sub(r"^\s*[A-Za-z]\w*\s*=\s*", "", s)  # "x = 5"
    s = _strip_unit_words(s)  # trailing unit words
    s = s.strip().rstrip(".").strip()
    if not re.fullmatch(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", s):
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


# ---------------------------------------------------------------- math-verify in worker processes


def _as_latex(s: str) -> str:
    """Wrap a bare answer so math-verify parses it as LaTeX (keep it if it already has \\boxed or $...$)."""
    s = s.strip()
    if "\\boxed" in s or "\\fbox" in s:
        return s
    if s.startswith("$") and s.endswith("$") and len(s) > 1:
        s = s.strip("$").strip()
    return "\\boxed{" + s + "}"


def _verify(gold: str, pred: str) -> bool:
    """math-verify with the gold first; runs inside a worker process (timeouts are the parent's job)."""
    from math_verify import parse, verify

    g = parse(_as_latex(gold), parsing_timeout=None)
    p = parse(_as_latex(pred), parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _worker_main() -> None:
    """Worker loop over stdin/stdout: read a JSON [gold, pred] per line, answer 1 / 0 / "error" per line."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
    out = os.fdopen(os.dup(1), "w")  # private reply channel; stray prints go to stderr instead
    os.dup2(2, 1)
    import math_verify  # noqa: F401  (imported before announcing readiness, so imports are not timed)

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            res = "1" if _verify(*json.loads(line)) else "0"
        except Exception:
            res = '"error"'
        out.write(res + "\n")
        out.flush()


class _Worker:
    """One grading process: a fresh interpreter (safe with torch/CUDA loaded, no __main__ re-import)."""

    def __init__(self) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from lrs.grading import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        self.ready = False
        self.job: int | None = None
        self.deadline = 0.0

    def send(self, gold: str, pred: str) -> None:
        self.proc.stdin.write(json.dumps([gold, pred]) + "\n")
        self.proc.stdin.flush()

    def recv(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("grading worker exited")
        return line.strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """A few math-verify worker processes; runs jobs with a per-job wall-clock deadline."""

    STARTUP_TIMEOUT = 120.0

    def __init__(self, workers: int) -> None:
        self.size = max(1, workers)
        self.workers = [_Worker() for _ in range(self.size)]
        self.lock = threading.Lock()

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers[self.workers.index(w)] = _Worker()

    def run(self, jobs: list[tuple[str, str]], timeout: float) -> list[bool | None | str]:
        """Results per job: True/False, None (check raised or worker died), or "timeout"."""
        with self.lock:
            results: list[bool | None | str] = [None] * len(jobs)
            todo = list(range(len(jobs)))[::-1]
            started = time.monotonic()
            while todo or any(w.job is not None for w in self.workers):
                now = time.monotonic()
                for w in self.workers:
                    if w.ready and w.job is None and todo:
                        w.job, w.deadline = todo.pop(), now + timeout
                        try:
                            w.send(*jobs[w.job])
                        except OSError:
                            results[w.job] = None
                            self._replace(w)
                busy = [w for w in self.workers if w.job is not None]
                starting = [w for w in self.workers if not w.ready]
                if not busy and now - started > self.STARTUP_TIMEOUT:
                    raise LRSError(
                        "grading workers did not start in time; check that `import math_verify` works"
                    )
                waits = [w.deadline - now for w in busy] + ([1.0] if starting else [])
                ready = wait(
                    [w.proc.stdout for w in busy + starting], timeout=max(0.0, min(waits, default=1.0))
                )
                for w in list(self.workers):
                    if w.proc.stdout in ready:
                        try:
                            msg = w.recv()
                        except EOFError:
                            if not w.ready:
                                raise LRSError(
                                    "a grading worker died while starting; check that `import math_verify` works"
                                ) from None
                            results[w.job] = None  # crashed mid-check: count as a failed check
                            self._replace(w)
                            continue
                        if not w.ready:
                            w.ready = msg == "ready"
                            continue
                        results[w.job], w.job = {"1": True, "0": False}.get(msg), None
                    elif w.job is not None and time.monotonic() >= w.deadline:
                        results[w.job] = "timeout"
                        self._replace(w)
            return results

    def close(self) -> None:
        for w in self.workers:
            try:
                w.proc.stdin.close()  # EOF: the worker's loop ends
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.size != max(1, workers):
            if _POOL is not None:
                _POOL.close()
            _POOL = _Pool(workers)
        return _POOL


def close_pool() -> None:
    """Stop the grading worker processes (done automatically at exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


atexit.register(close_pool)


# ---------------------------------------------------------------- public grading API


def _missing_gold(gold: object) -> bool:
    """True for a gold answer that is None, empty or the string "None" (a bug upstream, never a real answer)."""
    return gold is None or str(gold).strip() in ("", "None")


@dataclass
class Grade:
    """One graded output: the extracted answer, whether it matches the gold, and which check decided."""

    pred: str | None
    correct: bool
    method: str  # "math-verify" | "numeric" | "none" | "timeout"
    timed_out: bool = False


def grade(outputs: list[str], golds: list[str], *, timeout: float = 5.0, workers: int = 2) -> list[Grade]:
    """Grade model outputs against gold answers (in order). A check running longer than `timeout` seconds is
    killed and counts as wrong (method "timeout"); the numeric fallback catches "1,000" / "$18" / "18 dollars".
    Raises LRSError if a gold answer is None, empty or "None"."""
    if len(outputs) != len(golds):
        raise LRSError(
            f"grade: got {len(outputs)} outputs but {len(golds)} gold answers; pass one gold per output"
        )
    if not timeout > 0:
        raise LRSError(f"grade: timeout must be a positive number of seconds, got {timeout}")
    missing = [i for i, g in enumerate(golds) if _missing_gold(g)]
    if missing:  # `\boxed{None}` would otherwise "match" a gold of None
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LRSError(
            f"grade: output {missing[0]}{more} has no gold answer (got {golds[missing[0]]!r:.40}); "
            "every graded item needs a non-empty gold answer"
        )
    # the parent's share: linear-time extraction from each output's last MAX_SCAN_CHARS characters and the
    # linear numeric fallback; every math-verify / sympy call runs in a worker under `timeout`
    preds = [extract_answer(o or "") for o in outputs]
    todo = [i for i, p in enumerate(preds) if p is not None]
    checked = _pool(workers).run([(str(golds[i]), preds[i]) for i in todo], timeout) if todo else []
    out = [Grade(pred=None, correct=False, method="none") for _ in outputs]
    for i, res in zip(todo, checked, strict=True):
        pred = preds[i]
        if res == "timeout":
            out[i] = Grade(pred, False, "timeout", timed_out=True)
        elif res is True:
            out[i] = Grade(pred, True, "math-verify")
        else:
            g, p = to_number(str(golds[i])), to_number(pred)
            if g is not None and p is not None:
                out[i] = Grade(pred, _numbers_equal(g, p), "numeric")
            else:
                out[i] = Grade(pred, False, "math-verify")
    return out


def grade_one(output: str, gold: str, timeout: float = 5.0) -> Grade:
    """Grade a single output against its gold answer (see `grade`)."""
    return grade([output], [gold], timeout=timeout)[0]

"""What the report reads and the numbers of its first two sections: the run's configuration and the headline.

Why here: the loaders and the headline arithmetic are shared by the Markdown and HTML renderings and by
``summary.json``. Every statistic comes from :mod:`lrs.stats` (Wilson CI, paired bootstrap, exact McNemar,
minimum detectable effect) or :mod:`lrs.analysis.rectify` (LRS against its matched control); this module only
collects inputs and arranges outputs.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from lrs.analysis.behaviours import lexicon_info
from lrs.analysis.rectify import method_vs_control
from lrs.errors import LRSError
from lrs.evaluate import compare, load_result
from lrs.grading import last_boxed
from lrs.stats import mcnemar_mde, proportion_ci
from lrs.steering import METHODS

#: methods without steering: the references (prompt styles) and best-of-N, which picks among unsteered
#: samples; none of them is "steered", so rectification and the trace cards never follow one
UNSTEERED = ("base", "cot", "fewshot", "bon")
#: each method's matched random control (same gate and |Δh| for LRS; the same per-layer norms for vectors)
MATCHED_CONTROLS = {"lrs": "random", "vectors": "vectors-random"}


def matched_pair(results: dict[str, dict]) -> tuple[str, str] | None:
    """The first (method, matched control) pair of :data:`MATCHED_CONTROLS` with both results present."""
    return next(((m, c) for m, c in MATCHED_CONTROLS.items() if m in results and c in results), None)


def parse_methods(spec: str | list[str] | None) -> list[str] | None:
    """``"base,lrs,random"`` (or a list) → validated method names in that order; None keeps every method."""
    if spec is None:
        return None
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise LRSError(f"--methods: unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    if not names:
        raise LRSError("--methods is empty: give e.g. base,lrs,random,diffmean")
    return list(dict.fromkeys(names))


def load_results(eval_dir: Path, methods: list[str] | None = None) -> dict[str, dict]:
    """Method results in ``eval_dir`` (the order of ``methods``, else the registry order).

    Requested methods without a result are left out (the report lists them); no result at all is an error.
    """
    eval_dir = Path(eval_dir)
    found = {}
    for name in methods or list(METHODS):
        res = load_result(eval_dir, name)
        if res is not None:
            found[name] = res
    if not found:
        what = f" for {', '.join(methods)}" if methods else ""
        raise LRSError(f"no results{what} in {eval_dir}: run `lrs eval` (or `lrs demo`) first")
    return found


def by_id(result: dict) -> dict[str, dict]:
    """A result's records keyed by problem id (as strings, the way the analyses key them)."""
    return {str(r["id"]): r for r in result["records"]}


def has_tokens(result: dict) -> bool:
    """Every record carries ``token_ids`` (the run was made with ``--log-tokens``)."""
    return bool(result["records"]) and all("token_ids" in r for r in result["records"])


def has_events(result: dict) -> bool:
    """Some record carries per-token ``events`` (``--log-events``, ``--log-tokens`` or ``--shadow``)."""
    return any(isinstance(r.get("events"), list) and r["events"] for r in result["records"])


def run_root(eval_dir: Path) -> Path | None:
    """The run directory of ``<run>/eval/<task>/<split>``, or None when the folder is laid out otherwise."""
    eval_dir = Path(eval_dir).resolve()
    if len(eval_dir.parents) >= 3 and eval_dir.parents[1].name == "eval":
        return eval_dir.parents[2]
    return None


def _artefact_json(path: Path, want_hash: str | None) -> dict | None:
    """An artefact's JSON sidecar when it exists and (if a hash is expected) is that artefact."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if want_hash and meta.get("hash") != want_hash:
        return None
    return meta


def _steerer(summary: dict) -> dict:
    return (summary.get("key_parts") or {}).get("steerer") or {}


def _tau_r(summary: dict) -> float | None:
    """The tau_r the gate used: with a quantile gate the steerer's stats hold the quantile's value, while the
    settings in the cache key keep the unused default."""
    used = ((summary.get("steering") or {}).get("config") or {}).get("tau_r")
    return used if used is not None else (_steerer(summary).get("config") or {}).get("tau_r")


def _short(h: str | None, n: int = 12) -> str:
    return str(h)[:n] if h else "–"


def run_config(results: dict[str, dict], eval_dir: Path) -> dict:
    """Section 0: what produced these results (model, layer, artefact hashes, steering settings, sizes,
    seeds, versions, git, tagger lexicon), plus one row per method and whether the methods agree."""
    first = next(iter(results.values()))["summary"]
    latent = next(
        (r["summary"] for r in results.values() if _steerer(r["summary"]).get("kind") == "latent"), None
    )
    st = _steerer(latent) if latent else {}
    cfg = st.get("config") or {}
    root = run_root(eval_dir)
    layer = None
    if root is not None:
        # the default sidecars first, then any sidecar in the run whose hash is the one the run used
        # (an eval made with an explicit --encoder/--reward path)
        found = [(root / f"{key}.json", st.get(key)) for key in ("encoder", "reward")]
        found += [
            (p, st.get(k)) for k in ("encoder", "reward") if st.get(k) for p in sorted(root.glob("*.json"))
        ]
        for path, want in found:
            meta = _artefact_json(path, want)
            if meta is not None:
                layer = (meta.get("config") or {}).get("layer", (meta.get("provenance") or {}).get("layer"))
                if layer is not None:
                    break
    lex = lexicon_info()
    out = dict(
        model=first.get("model"),
        layer=layer,
        encoder=st.get("encoder"),
        reward=st.get("reward"),
        k=cfg.get("k"),
        alpha=cfg.get("alpha"),
        tau_r=_tau_r(latent) if latent else None,
        tau_c=cfg.get("tau_c"),
        tau_r_quantile=cfg.get("tau_r_quantile"),
        gate=cfg.get("gate"),
        warmup=cfg.get("warmup"),
        every=cfg.get("every"),
        task=first.get("task"),
        split=first.get("split", Path(eval_dir).name),
        split_seed=first.get("split_seed"),
        n=first.get("n"),
        seed=first.get("seed"),
        dtype=first.get("dtype"),
        device=first.get("device"),
        batch_size=first.get("batch_size"),
        max_new_tokens=first.get("max_new_tokens"),
        versions=first.get("versions", {}),
        git=first.get("git"),
        lexicon_version=lex["version"],
        lexicon_sha256=lex["sha256"],
        eval_dir=str(eval_dir),
    )
    rows = []
    for name, res in results.items():
        s = res["summary"]
        sst = _steerer(s)
        c = sst.get("config") or {}
        log = s.get("logging") or (s.get("key_parts") or {}).get("log") or {}
        rows.append(
            dict(
                method=name,
                cache_key=s.get("cache_key"),
                kind=(
                    f"best-of-{s['samples_per_problem']} by {s['select']} (T = {s['temperature']})"
                    if s.get("method") == "bon"
                    else sst.get("kind", "none" if not sst else "?")
                ),
                k=c.get("k"),
                alpha=c.get("alpha", sst.get("alpha")),
                tau_r=_tau_r(s),
                tau_c=c.get("tau_c"),
                artefacts=", ".join(
                    f"{k} {_short(sst[k])}" for k in ("encoder", "reward", "vectors", "adapter") if sst.get(k)
                )
                or ", ".join(  # best-of-N: the hashes of the encoder and reward model that picked
                    f"{k} {_short((s.get('key_parts') or {}).get(k))}"
                    for k in ("encoder", "reward")
                    if s.get("method") == "bon"
                ),
                logged=", ".join(k for k in ("tokens", "events", "shadow") if log.get(k)) or "–",
                n=s.get("n"),
            )
        )
    out["methods"] = rows
    mixed = [
        k
        for k in ("model", "dtype", "seed", "batch_size", "max_new_tokens", "n")
        if len({json.dumps(r["summary"].get(k)) for r in results.values()}) > 1
    ]
    out["mixed"] = mixed
    return out


# ---- section 1: the headline ------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _mde(n: int, discordant: int) -> float | None:
    """Minimum detectable net accuracy change at ``n`` problems and ``discordant`` observed discordant pairs."""
    if n <= 0 or discordant <= 0:
        return None
    v = mcnemar_mde(n, discordant / n)
    return None if math.isnan(v) else v


def _boxed(recs: list[dict]) -> int:
    """Records whose output holds a final ``\\boxed{}`` answer (the format, apart from the reasoning)."""
    return sum(last_boxed(r.get("output") or "") is not None for r in recs)


def headline(results: dict[str, dict], base: str = "base") -> list[dict]:
    """One row per method: n, accuracy with its Wilson CI, and against ``base`` (when both exist and cover the
    same problems) Δ with a paired bootstrap CI, fixed / broken, exact McNemar p and the minimum detectable
    effect; plus mean tokens, % truncated, % with a ``\\boxed{}`` answer (format apart from reasoning),
    % tokens steered, steering events per problem and seconds per problem."""
    ref = results.get(base)
    rows = []
    for name, res in results.items():
        s, recs = res["summary"], res["records"]
        n = len(recs)
        k = sum(bool(r["correct"]) for r in recs)
        lo, hi = proportion_ci(k, n, method="wilson") if n else (math.nan, math.nan)
        steering = s.get("steering") or {}
        events = steering.get("steered_tokens")
        if events is None and name not in UNSTEERED and any("steers" in r for r in recs):
            events = sum(r.get("steers", 0) for r in recs)
        wall = s.get("wall_time_s")
        row = dict(
            method=name,
            n=n,
            correct=k,
            acc=k / n if n else math.nan,
            ci95=[lo, hi],
            mean_tokens=sum(r.get("tokens", 0) for r in recs) / n if n else math.nan,
            truncated=sum(bool(r.get("truncated")) for r in recs) / n if n else math.nan,
            boxed=_boxed(recs) / n if n else math.nan,
            steer_rate=steering.get("steer_rate"),
            events_per_problem=events / n if events is not None and n else None,
            s_per_problem=wall / n if wall is not None and n else None,
            resumed=bool(s.get("resumed_from")),
        )
        if ref is not None and name != base:
            try:
                cmp = compare(ref, res)
            except LRSError as e:
                row["compare_error"] = str(e)
            else:
                disc = cmp["fixed"] + cmp["broken"]
                row.update(
                    delta=cmp["delta"],
                    delta_ci=cmp["delta_ci"],
                    fixed=cmp["fixed"],
                    broken=cmp["broken"],
                    mcnemar_p=cmp["mcnemar_p"],
                    discordant=disc,
                    mde=_mde(cmp["n"], disc),
                )
        rows.append(row)
    return rows


def versus_control(
    results: dict[str, dict], method: str | None = None, control: str | None = None, base: str = "base"
):
    """A method against its matched random control (``rectify.method_vs_control``: net fixes of each vs
    base, exact McNemar on the problems only one of them gets right) and the MDE at that discordance; None
    when a run is missing or the problem sets differ. Without ``method``/``control``: the first pair of
    :data:`MATCHED_CONTROLS` present (LRS and ``random``, else trained ``vectors`` and ``vectors-random``)."""
    if method is None or control is None:
        pair = matched_pair(results)
        if pair is None:
            return None
        method, control = pair
    if not all(m in results for m in (method, control, base)):
        return None
    try:
        out = method_vs_control(by_id(results[method]), by_id(results[control]), by_id(results[base]))
    except LRSError:
        return None
    disc = out["method_only_right"] + out["control_only_right"]
    out.update(method=method, control=control, discordant=disc, mde=_mde(out["n"], disc))
    return out


def pct(x: float | None, digits: int = 1, signed: bool = False) -> str:
    """A share as a percentage string (``–`` for None/NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}%}" if signed else f"{x:.{digits}%}"


def num(x, spec: str = ".3g") -> str:
    """A number for a table cell (``–`` for None/NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)

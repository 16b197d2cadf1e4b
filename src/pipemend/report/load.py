"""Read a run directory into the plain data the report templates show.

Everything here tolerates a partial run: a running or crashed run lacks
verdicts, evaluations, diagnoses or the test split, and a torn or missing
file only blanks its own part of the report. The sources, by precedence:
``journal.jsonl`` (what is done), ``candidates/<n>/verdict.json`` (the gate's
numbers), ``run.json`` (status, config), the evaluation folders and the
gateway's call log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from ..fsutil import read_json, read_jsonl
from ..gateway.pricing import cost_usd
from ..journal import CandidateRecord, RunState, fold
from ..rundir import JOURNAL
from .explain import explain, guarantee, is_confirmed_format, per_candidate_note, raced_out_look, racing_saved

RIGHT = 0.5
"""An example is right when its score is at least this (the gate's rule)."""
RUNGS = ("prompt", "retrieval", "context", "model")
AGENT_CALL_LOGS = ("agent/gateway/calls.jsonl",)
"""The agent-side gateway's call log (``optimize`` runs an LLM proposer's own gateway with run_dir RUN_DIR/agent)."""


def _json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's rows (a torn last line dropped); [] when missing; the good rows before a bad line."""
    rows: list[dict[str, Any]] = []
    try:
        for row in read_jsonl(path):
            if isinstance(row, dict):
                rows.append(row)
    except (OSError, ValueError):
        pass
    return rows


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    except OSError:
        return ""


def _num(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def first_line(text: str, limit: int = 100) -> str:
    for line in (text or "").splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def branch_of(ref: str | None) -> str | None:
    """``refs/heads/x`` -> ``x``; other refs unchanged."""
    if not ref:
        return None
    return ref[len("refs/heads/"):] if ref.startswith("refs/heads/") else ref


def resolve_run_dir(run: str | Path) -> Path:
    """A run directory given as a path or as a run id under ``reports/``."""
    path = Path(run)
    if not (path / "run.json").is_file() and (Path("reports") / path / "run.json").is_file():
        path = Path("reports") / path
    if not (path / "run.json").is_file():
        raise UsageError(f"{run}: not a pipemend run directory (no run.json there or under reports/)")
    return path.resolve()


# --------------------------------------------------------------------------- the journal


def journal_state(run_dir: Path) -> RunState:
    """The journal folded by ``journal.fold``, reading every good line (a bad one ends the read, not the report)."""
    return fold(read_rows(run_dir / JOURNAL))


# --------------------------------------------------------------------------- candidates


def is_live(run_dir: Path, st: RunState) -> bool:
    """Whether the run may still be working on a started candidate (running, and its loop not stopped)."""
    return (_json(run_dir / "run.json") or {}).get("status") == "running" and st.stop_reason is None


def candidate_numbers(run_dir: Path, st: RunState) -> list[int]:
    """Finished candidates, the one in progress, and folders left by a crash.

    A started candidate whose folder holds nothing, in a run that is no longer
    working on it, is left out: that is the proposer running out of ideas.
    """
    live = is_live(run_dir, st)
    nums = set(st.candidates)
    if st.started is not None and live:
        nums.add(st.started)
    cdir = run_dir / "candidates"
    if cdir.is_dir():
        for p in cdir.iterdir():
            if p.is_dir() and p.name.isdigit() and int(p.name) not in nums:
                if live and st.started == int(p.name) or any(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name != "index.html"):
                    nums.add(int(p.name))
    return sorted(nums)


def read_verdict(run_dir: Path, n: int) -> dict[str, Any]:
    """``candidates/<n>/verdict.json`` as a dict ({} when missing, torn or not an object)."""
    verdict = _json(Path(run_dir) / "candidates" / str(n) / "verdict.json")
    return verdict if isinstance(verdict, dict) else {}


def _ids_of(value: Any) -> list[str]:
    return [str(i) for i in value] if isinstance(value, list) else []


def _count(value: Any) -> int | None:
    """A count written as a number or as the list it counts."""
    if isinstance(value, list):
        return len(value)
    n = _num(value)
    return None if n is None else int(n)


def gate_view(verdict: dict[str, Any]) -> dict[str, Any]:
    """What the report shows of a verdict's gate numbers beyond the score: confirmation, racing, the trade.

    Keys absent from an older verdict read as empty: no noise flips, no racing, no saving.
    """
    stats = verdict.get("stats") if isinstance(verdict.get("stats"), dict) else {}
    cost, latency = stats.get("cost") or {}, stats.get("latency") or {}
    look = raced_out_look(stats)
    saving = stats.get("saving") if isinstance(stats.get("saving"), dict) else None
    confirm = stats.get("confirm") if isinstance(stats.get("confirm"), dict) else {}
    racing = stats.get("racing") if isinstance(stats.get("racing"), dict) else None
    return {
        "confirmed": is_confirmed_format(stats),
        "noise_flips": _ids_of(stats.get("noise_flips")),
        "must_pass_broken": _ids_of(stats.get("must_pass_broken")),
        "confirm_runs": confirm.get("runs"), "confirm_examples": _count(confirm.get("examples")),
        "evaluated": stats.get("evaluated", stats.get("n")),
        "raced": racing is not None, "racing_saved": racing_saved(stats),
        "raced_out_share": _num((look or {}).get("share")),
        "p_value": _num(stats.get("p_value")), "alpha": _num(stats.get("alpha")),
        "accepted_as": stats.get("accepted_as"), "saving": saving,
        "objective": stats.get("objective"),
        "cost_base_usd": _num(cost.get("base_usd")), "cost_cand_usd": _num(cost.get("cand_usd")),
        "cost_ratio": _num(cost.get("ratio")), "latency_ratio": _num(latency.get("ratio")),
    }


def load_candidate(run_dir: Path, n: int, st: RunState) -> dict[str, Any]:
    """One candidate's row: its verdict's numbers, journal record, rationale, why it was kept or refused,
    and where its files are."""
    cdir = run_dir / "candidates" / str(n)
    verdict = read_verdict(run_dir, n)
    rec: CandidateRecord | None = st.candidates.get(n)
    stats = verdict.get("stats") or {}
    rationale = read_text(cdir / "rationale.md").strip() or (rec.rationale if rec else "").strip()
    waiting = rec is None and st.round is not None and n in st.round.judged
    if waiting:  # passed against its round's base; its verdict on disk is not the last word until candidate_done
        accepted = False
        status = ("being re-judged on the new base" if (cdir / "rebased").is_dir()
                  else "judged, waiting for the round's selection")
    elif verdict or rec:
        accepted = bool(verdict.get("accepted", rec.accepted if rec else False))
        status = "accepted" if accepted else "rejected"
    else:
        accepted, status = False, "in progress" if st.started == n and is_live(run_dir, st) else "unfinished"
    reasons = [str(r.get("text", r)) if isinstance(r, dict) else str(r)
               for r in verdict.get("reasons") or (rec.reasons if rec else [])]
    ref = (rec.ref if rec else None) or verdict.get("ref") or verdict.get("branch")
    meta = _json(cdir / "proposal.json") or {}
    delta = _num(stats.get("delta", rec.delta if rec else None))
    if verdict or rec:
        why = explain(verdict if verdict else {"accepted": accepted, "reasons": reasons,
                                               "stats": {"delta": delta} if delta is not None else None})
    else:
        why = ""
    return {
        "n": n, "status": status, "accepted": accepted, "rationale": rationale,
        "title": first_line(rationale) or "(no rationale)",
        "changed_files": list(verdict.get("changed_files") or []),
        "base_mean": _num(stats.get("base_mean")),
        "val_score": _num(stats.get("cand_mean", rec.val_score if rec else None)),
        "delta": delta,
        "ci_low": _num(stats.get("ci_low")), "ci_high": _num(stats.get("ci_high")),
        "n_val": stats.get("n"),
        "regressions": [str(i) for i in stats.get("regressions") or []],
        "fixed": [str(i) for i in stats.get("fixed") or []],
        **gate_view(verdict),
        "reasons": reasons, "reason": reasons[0] if reasons else ("" if accepted else "—"), "why": why,
        "ref": ref, "branch": branch_of(ref), "sha": rec.sha if rec else None,
        "rung": meta.get("rung"), "meta": meta,
        "val_dir": (rec.val_dir if rec else None) or (f"candidates/{n}/evals/val" if (cdir / "evals/val").is_dir() else None),
        "has_diff": (cdir / "diff.patch").is_file(),
        "page": f"candidates/{n}/index.html",
    }


def racing_total(cands: list[dict[str, Any]]) -> dict[str, Any]:
    """Candidate example-evaluations racing saved over the run, what raced candidates paid, and the share saved."""
    raced = [c for c in cands if c.get("raced")]
    saved = sum(int(c.get("racing_saved") or 0) for c in raced)
    paid = sum(int(c.get("evaluated") or 0) for c in raced)
    return {"candidates": len(raced), "raced_out": sum(1 for c in raced if c.get("raced_out_share") is not None),
            "saved": saved, "paid": paid, "share": saved / (saved + paid) if saved + paid else None}


def run_guarantee(gates: dict[str, Any], cands: list[dict[str, Any]]) -> str:
    """The run-level sentence: the error-budget guarantee, or what a run judged before it promised."""
    judged_before = any(c.get("n_val") is not None and c.get("alpha") is None and not c.get("raced") for c in cands)
    return per_candidate_note(gates) if judged_before else guarantee(gates)


def base_val_dir_for(cands: list[dict[str, Any]], n: int, baseline_val: str | None) -> str | None:
    """The val evaluation candidate ``n`` was gated against: the last accepted one before it, else the baseline."""
    prior = [c for c in cands if c["accepted"] and c["n"] < n and c.get("val_dir")]
    return prior[-1]["val_dir"] if prior else baseline_val


# --------------------------------------------------------------------------- evaluations


def scored_rows(run_dir: Path, rel: str | None) -> dict[str, dict[str, Any]]:
    if not rel:
        return {}
    return {str(r.get("id")): r for r in read_rows(run_dir / rel / "scored.jsonl")}


def summary_score(run_dir: Path, rel: str) -> float | None:
    return _num((_json(run_dir / rel / "summary.json") or {}).get("score"))


def compare_rows(base: dict[str, dict[str, Any]], cand: dict[str, dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(fixed, broken) examples of ``cand`` relative to ``base``, by id, with both scores and outputs."""
    fixed, broken = [], []
    for i, b in base.items():
        c = cand.get(i)
        if c is None:
            continue
        bs, cs = _num(b.get("score")) or 0.0, _num(c.get("score")) or 0.0
        row = {"id": i, "base_score": bs, "cand_score": cs, "base_output": _short(b.get("output")),
               "cand_output": _short(c.get("output")), "cand_error": c.get("error")}
        if bs < RIGHT <= cs:
            fixed.append(row)
        elif cs < RIGHT <= bs:
            broken.append(row)
    return fixed, broken


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_trace(run_dir: Path, eval_rel: str | None, example_id: str) -> dict[str, Any] | None:
    if not eval_rel:
        return None
    path = run_dir / eval_rel / "traces" / f"{example_id}.json"
    if path.parent != run_dir / eval_rel / "traces":
        return None
    trace = _json(path)
    return trace if isinstance(trace, dict) else None


# --------------------------------------------------------------------------- the failure ladder


def ladder(diag: dict[str, Any] | None) -> dict[str, Any] | None:
    """A diagnosis (``pipemend-diagnosis-1``/``-2``) as rows of rung, count, share, ids (and the failures on no
    rung: errors, and ``-2``'s unattributed ones)."""
    if not isinstance(diag, dict):
        return None
    counts = diag.get("counts") or {}
    ids = diag.get("ids") or {}
    total = sum(int(counts.get(r) or 0) for r in RUNGS)
    rows = [{"rung": r, "count": int(counts.get(r) or 0), "share": (int(counts.get(r) or 0) / total) if total else 0.0,
             "ids": list(ids.get(r) or [])} for r in RUNGS]
    return {"rows": rows, "errors": int(diag.get("errors") or 0), "error_ids": list(diag.get("error_ids") or []),
            "unattributed": int(diag.get("unattributed") or 0),
            "unattributed_ids": list(diag.get("unattributed_ids") or []),
            "n_examples": diag.get("n_examples"), "n_failed": diag.get("n_failed"),
            "recommended": diag.get("recommended")}


# --------------------------------------------------------------------------- costs


def _request_key(row: dict[str, Any]) -> str:
    return json.dumps([row.get("model"), row.get("request")], sort_keys=True, default=str)


def call_costs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Spend, tokens and cache savings of a call log.

    A cache hit costs nothing; what it saved is the cost recorded on the
    original miss of the same request, else the price table applied to the
    hit's usage.
    """
    out = {"calls": 0, "misses": 0, "hits": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0,
           "usd": 0.0, "saved_usd": 0.0, "saved_input_tokens": 0, "saved_output_tokens": 0}
    miss_cost: dict[str, float] = {}
    for row in rows:
        if row.get("error"):
            out["errors"] += 1
            continue
        out["calls"] += 1
        tin, tout = int(row.get("input_tokens") or 0), int(row.get("output_tokens") or 0)
        if row.get("cache") == "hit":
            out["hits"] += 1
            out["saved_input_tokens"] += tin
            out["saved_output_tokens"] += tout
            key = _request_key(row)
            if key in miss_cost:
                out["saved_usd"] += miss_cost[key]
            else:
                usage = (row.get("response") or {}).get("usage") if isinstance(row.get("response"), dict) else None
                usage = usage or {"input_tokens": tin, "output_tokens": tout}
                out["saved_usd"] += cost_usd(str(row.get("model") or ""), usage)
        else:
            out["misses"] += 1
            out["input_tokens"] += tin
            out["output_tokens"] += tout
            cost = _num(row.get("cost_usd")) or 0.0
            out["usd"] += cost
            miss_cost.setdefault(_request_key(row), cost)
    return out


def agent_costs(run_dir: Path, cands: list[dict[str, Any]]) -> dict[str, Any]:
    """The proposer's own spend: an agent-side call log if there is one, else each candidate's ``proposal.json``."""
    for rel in AGENT_CALL_LOGS:
        if (run_dir / rel).is_file():
            c = call_costs(read_rows(run_dir / rel))
            return {"source": rel, "turns": c["calls"], "input_tokens": c["input_tokens"],
                    "output_tokens": c["output_tokens"], "usd": c["usd"]}
    out = {"source": "proposal.json", "turns": 0, "input_tokens": 0, "output_tokens": 0, "usd": 0.0}
    for c in cands:
        meta = c.get("meta") or {}
        spent = meta.get("spent") if isinstance(meta.get("spent"), dict) else meta

        def get(key: str) -> float:  # the claude proposer writes agent_<key> (budget.spent() prefixed)
            return _num(spent.get(f"agent_{key}", spent.get(key))) or 0.0

        out["turns"] += int(get("turns"))
        out["input_tokens"] += int(get("input_tokens"))
        out["output_tokens"] += int(get("output_tokens"))
        out["usd"] += get("usd")
    return out


# --------------------------------------------------------------------------- the whole run


def _frozen_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(read_text(run_dir / "frozen" / "pipemend.yaml")) or {}
        return data if isinstance(data, dict) else {}
    except Exception:  # noqa: BLE001 - a report never fails on a bad manifest copy
        return {}


def _gates_of(manifest: dict[str, Any]) -> dict[str, Any]:
    gates = manifest.get("gates")
    return gates if isinstance(gates, dict) else {}


def gate_overview(run_dir: Path) -> dict[str, Any]:
    """The gate's side of a run for a summary: why each candidate was kept or refused (by number), racing's
    savings (``racing_total``) and the run-level guarantee sentence."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UsageError(f"{run_dir}: not a pipemend run directory (no run.json)")
    st = journal_state(run_dir)
    cands = [load_candidate(run_dir, n, st) for n in candidate_numbers(run_dir, st)]
    gates = _gates_of(_frozen_manifest(run_dir))
    return {"why": {c["n"]: c["why"] for c in cands if c["why"]}, "racing": racing_total(cands),
            "guarantee": run_guarantee(gates, cands)}


def load_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, as plain dicts and lists."""
    run_dir = Path(run_dir)
    run = _json(run_dir / "run.json")
    if not isinstance(run, dict):
        raise UsageError(f"{run_dir}: not a pipemend run directory (no readable run.json)")
    cfg = run.get("config") or {}
    manifest = _frozen_manifest(run_dir)
    st = journal_state(run_dir)
    cands = [load_candidate(run_dir, n, st) for n in candidate_numbers(run_dir, st)]
    accepted = [c for c in cands if c["accepted"]]
    best = accepted[-1] if accepted else None

    baseline_ev = st.baseline or {}
    baseline_val_dir = baseline_ev.get("val_dir") or ("evals/baseline-val" if (run_dir / "evals/baseline-val").is_dir() else None)
    base_val = _num(baseline_ev.get("val_score"))
    if base_val is None and baseline_val_dir:
        base_val = summary_score(run_dir, baseline_val_dir)
    base_summary = _json(run_dir / (baseline_val_dir or "evals/baseline-val") / "summary.json") or {}
    for c in cands:
        c["base_val_dir"] = base_val_dir_for(cands, c["n"], baseline_val_dir)
    gates = _gates_of(manifest)

    test = st.test or {}
    test_base = _num(test.get("baseline"))
    if test_base is None:
        test_base = summary_score(run_dir, "evals/baseline-test")
    test_best = _num(test.get("best"))
    if test_best is None and best is not None:
        test_best = summary_score(run_dir, f"candidates/{best['n']}/evals/test")

    fixed, broken = [], []
    if best is not None and best.get("val_dir"):
        fixed, broken = compare_rows(scored_rows(run_dir, baseline_val_dir), scored_rows(run_dir, best["val_dir"]))

    pipeline = call_costs(read_rows(run_dir / "gateway" / "calls.jsonl"))
    agent = agent_costs(run_dir, cands)
    started, ended = _num(run.get("started_at")), _num(run.get("ended_at"))
    status = run.get("status") or "unknown"
    duration = ((ended or time.time()) - started) if started else None
    budget = _num(cfg.get("budget_usd"))
    diag_after = _json(run_dir / "candidates" / str(best["n"]) / "diagnosis.json") if best else None
    return {
        "run_id": run.get("run_id") or run_dir.name, "kind": run.get("kind"), "status": status,
        "target": run.get("target") or cfg.get("target"), "name": manifest.get("name"),
        "proposer": cfg.get("proposer"),
        "model": cfg.get("model") or (manifest.get("llm") or {}).get("model"),
        "agent_model": cfg.get("agent_model"),
        "budget_usd": budget, "max_candidates": cfg.get("max_candidates"),
        "started_at": started, "ended_at": ended, "duration_s": duration,
        "stop_reason": st.stop_reason or run.get("stop_reason"),
        "error": run.get("error") or st.error,
        "baseline": {"val": base_val, "val_ci": (_num(base_summary.get("ci_low")), _num(base_summary.get("ci_high"))),
                     "train": _num(baseline_ev.get("train_score")), "n_val": base_summary.get("n"),
                     "test": test_base, "val_dir": baseline_val_dir},
        "test": {"baseline": test_base, "best": test_best, "error": test.get("error")},
        "candidates": cands, "best": best, "in_progress": st.started,
        "ladder_before": ladder(_json(run_dir / "diagnosis.json")), "ladder_after": ladder(diag_after),
        "fixed": fixed, "broken": broken,
        "costs": {"pipeline": pipeline, "agent": agent, "total_usd": pipeline["usd"] + agent["usd"],
                  "budget_used": (pipeline["usd"] / budget) if budget else None},
        "gates": gates, "guarantee": run_guarantee(gates, cands), "racing": racing_total(cands),
    }

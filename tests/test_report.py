"""The run report: HTML (+ candidate pages) and Markdown for finished, running, crashed and fruitless runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runbuilder import build_run, default_candidates

from pipemend.errors import UsageError
from pipemend.fsutil import atomic_write_json
from pipemend.report import render_report
from pipemend.report.load import call_costs, load_run
from pipemend.report.render import align_steps, summarize_transcript
from pipemend.rundir import create_run_dir

CHROMIUM = "/usr/bin/chromium"


def _no_external_fetch(html: str) -> None:
    assert "<script" not in html.lower()
    assert "<link" not in html.lower()
    assert "@import" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the report must not fetch anything"


def test_finished_run_renders_everything(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    html_path, md_path = render_report(run.run_dir)
    assert (html_path, md_path) == (run.run_dir / "report.html", run.run_dir / "report.md")
    html = html_path.read_text()
    _no_external_fetch(html)
    # the plot: two accepted dots, one rejected cross, one candidate refused before val, the baseline line
    svg = re.search(r"<svg.*?</svg>", html, re.S).group(0)
    assert svg.count('class="pt-accepted"') == 2
    assert svg.count('class="pt-rejected"') == 1
    assert svg.count('class="pt-noeval"') == 1
    assert 'class="baseline"' in svg
    # the candidates table: one row per candidate, linking its page, with delta, CI, reason and branch
    table = re.search(r'<table class="candidates">.*?</table>', html, re.S).group(0)
    assert table.count("<tr class=") == 4
    for n in (1, 2, 3, 4):
        assert f'href="candidates/{n}/index.html"' in table
        assert (run.run_dir / "candidates" / str(n) / "index.html").is_file()
    assert "+0.167" in table and "[+0.000, +0.500]" in table
    assert "pipemend/optimize-fixture/cand-3" in table and "refs/pipemend/optimize-fixture/rejected/2" in table
    assert "1: <span class=\"mono\">v1</span>" in table  # candidate 2's regression
    assert "protected file" in table
    # summary, ladder before and after, fixed examples, test split, costs
    assert "claude-haiku-4-5" in html and "claude (claude-sonnet-4-5)" in html
    assert "$0.0015 of $2.00" in html
    assert "best (candidate 3)" in html
    assert re.search(r"<td>prompt.*?<td class=\"num\">3</td>.*?<td class=\"num\">1</td>", html, re.S)
    assert re.search(r'<td class="mono">v2</td>.*?Paris', html, re.S)
    assert "0.333" in html and "0.667" in html  # test split of baseline and best
    assert "$0.0075" in html  # what the cache saved
    assert "$0.0800" in html  # the agent's spend from proposal.json
    assert "pipemend apply optimize-fixture best" in html
    # the markdown: short, with the headline numbers and every candidate
    md = md_path.read_text()
    assert len(md.splitlines()) < 60
    assert "val 0.500 → 0.833" in md
    assert md.count("\n| ") >= 4 + 2 + 6
    assert "`pipemend/optimize-fixture/cand-3`" in md
    assert "Fixed 2 (v2, v3)" in md
    # no temporary files left behind by the atomic writes
    assert not list(run.run_dir.rglob(".*.tmp"))


def test_candidate_pages_show_diff_transcript_and_traces_side_by_side(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    render_report(run.run_dir)
    page1 = (run.run_dir / "candidates/1/index.html").read_text()
    _no_external_fetch(page1)
    assert 'href="../../report.html"' in page1
    assert "style=\"color:" in page1 and "answer with the entity only" in page1  # pygments, inline styles
    assert "The baseline wrapped answers in sentences." in page1
    assert "3 assistant turn(s) over 11 record(s); outcome: <strong>submitted</strong>" in page1
    assert re.search(r"submit</td><td class=\"num\">1", page1)
    assert re.search(r"read_file</td><td class=\"num\">1", page1)
    assert "Submitted: answers are now &lt;b&gt;short&lt;/b&gt;." in page1  # escaped, never markup
    assert "Examples it fixed (1)" in page1 and ">v2</span>" in page1
    assert "It is &lt;i&gt;probably&lt;/i&gt; Lyon" in page1
    # candidate 2 broke v1: its trace has an extra failing parse step the base lacks
    page2 = (run.run_dir / "candidates/2/index.html").read_text()
    assert "Examples it broke (1)" in page2
    assert "no such step" in page2
    assert "ValueError: no answer found" in page2
    assert "val delta +0.0000 below min_delta" in page2
    page4 = (run.run_dir / "candidates/4/index.html").read_text()
    assert "data/rows.jsonl: protected file" in page4 and "No transcript" in page4


def test_running_run(tmp_path: Path) -> None:
    run = build_run(tmp_path, status="running", candidates=default_candidates()[:2], in_progress=True)
    html_path, md_path = render_report(run.run_dir)
    html = html_path.read_text()
    assert "This run is still running (candidate 3 in progress)" in html
    assert '<span class="badge in-progress">in progress</span>' in html
    assert "not yet" in html  # no test split yet
    assert "Still running (candidate 3 in progress)" in md_path.read_text()


def test_crashed_run(tmp_path: Path) -> None:
    run = build_run(tmp_path, status="failed", candidates=default_candidates()[:2])
    html_path, md_path = render_report(run.run_dir)
    html = html_path.read_text()
    assert "The run failed." in html and "RuntimeError: the sandbox died" in html
    assert '<span class="badge unfinished">unfinished</span>' in html
    page3 = (run.run_dir / "candidates/3/index.html").read_text()
    assert "KeyError: &#39;x&#39;" in page3
    assert "The run failed: RuntimeError: the sandbox died" in md_path.read_text()


def test_run_with_no_accepted_candidate(tmp_path: Path) -> None:
    cands = [c for c in default_candidates() if not c.accept]
    run = build_run(tmp_path, candidates=cands)
    html_path, md_path = render_report(run.run_dir)
    html = html_path.read_text()
    assert "No candidate was accepted" in html
    assert "No accepted candidate: nothing fixed or broken." in html
    assert html.count('class="pt-accepted"') == 0 and html.count('class="pt-rejected"') == 1
    md = md_path.read_text()
    assert "no change accepted" in md and "apply" not in md


def test_freshly_started_run_and_torn_files(tmp_path: Path) -> None:
    run_dir = create_run_dir(tmp_path / "reports", "optimize-new", kind="optimize", target=tmp_path, config={})
    with open(run_dir / "journal.jsonl", "a") as f:
        f.write('{"format": "pipemend-journal-1", "event": "candidate_do')  # a kill mid-write
    (run_dir / "candidates/1").mkdir(parents=True)
    (run_dir / "candidates/1/verdict.json").write_text("{not json")
    html_path, md_path = render_report(run_dir)
    html = html_path.read_text()
    assert '<span class="badge unfinished">unfinished</span>' in html  # candidate 1's folder is there
    assert html.count('class="pt-noeval"') == 1  # in the plot, without a score
    assert "No diagnosis yet." in html
    assert md_path.read_text().startswith("## pipemend optimize-new: no change accepted (running)")


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a pipemend run directory"):
        render_report(tmp_path)


def test_rationale_is_escaped(tmp_path: Path) -> None:
    cands = default_candidates()[:1]
    cands[0].rationale = "<script>alert(1)</script> & more"
    run = build_run(tmp_path, candidates=cands)
    html_path, _ = render_report(run.run_dir)
    for text in (html_path.read_text(), (run.run_dir / "candidates/1/index.html").read_text()):
        assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text


def test_call_costs_price_cache_hits_from_the_original_miss() -> None:
    req = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "q"}]}
    rows = [
        {"model": "claude-haiku-4-5", "request": req, "cache": "miss", "cost_usd": 0.25, "input_tokens": 10, "output_tokens": 2},
        {"model": "claude-haiku-4-5", "request": req, "cache": "hit", "cost_usd": 0.0, "input_tokens": 10, "output_tokens": 2},
        # no earlier miss: priced from the table (haiku-4: $1 / $5 per million)
        {"model": "claude-haiku-4-5", "request": {"other": 1}, "cache": "hit", "cost_usd": 0.0,
         "input_tokens": 1_000_000, "output_tokens": 0, "response": {"usage": {"input_tokens": 1_000_000}}},
        {"model": "claude-haiku-4-5", "request": req, "cache": "miss", "error": {"message": "budget exhausted"}},
    ]
    c = call_costs(rows)
    assert (c["calls"], c["misses"], c["hits"], c["errors"]) == (3, 1, 2, 1)
    assert c["usd"] == pytest.approx(0.25)
    assert c["saved_usd"] == pytest.approx(0.25 + 1.0)
    assert (c["input_tokens"], c["saved_input_tokens"]) == (10, 1_000_010)


def test_transcript_summary_and_step_alignment() -> None:
    s = summarize_transcript([
        {"type": "assistant", "message": {"role": "assistant", "content": [{"type": "tool_use", "name": "run_train"}]}},
        {"type": "tool_call", "name": "run_train"},
        {"role": "assistant", "content": "done, submitting"},
    ])
    assert s == {"rows": 3, "turns": 2, "tools": [("run_train", 1)], "final": "done, submitting", "outcome": None}
    s = summarize_transcript([{"role": "assistant", "content": [{"type": "tool_use", "name": "grep"}]}] * 2)
    assert s["tools"] == [("grep", 2)] and s["turns"] == 2
    assert summarize_transcript([]) is None
    base = {"steps": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}
    cand = {"steps": [{"name": "a"}, {"name": "x"}, {"name": "c"}]}
    pairs = [(b and b["name"], c and c["name"]) for b, c in align_steps(base, cand)]
    assert pairs == [("a", "a"), ("b", None), (None, "x"), ("c", "c")]
    assert align_steps(None, cand)[0] == (None, align_steps(cand, cand)[0][1])


def test_loader_links_each_candidate_to_the_base_it_was_gated_against(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    data = load_run(run.run_dir)
    bases = {c["n"]: c["base_val_dir"] for c in data["candidates"]}
    assert bases == {1: "evals/baseline-val", 2: "candidates/1/evals/val", 3: "candidates/1/evals/val",
                     4: "candidates/3/evals/val"}
    atomic_write_json(run.run_dir / "candidates/3/diagnosis.json", {"oops": True})  # unreadable shape: blank counts
    assert load_run(run.run_dir)["ladder_after"]["rows"][0]["count"] == 0


@pytest.mark.chromium
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (/usr/bin/chromium)")
def test_report_in_headless_chromium(tmp_path: Path) -> None:
    run = build_run(tmp_path)
    html_path, _ = render_report(run.run_dir)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert re.search(r"<svg[^>]*class=\"score-plot\"", dom)
    assert dom.count("pt-accepted") == 2 and "pt-rejected" in dom
    assert re.search(r'<table class="candidates">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1).count("<tr") == 4
    png = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={png}", url], capture_output=True, timeout=120, check=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    colours = _png_colours(png)
    assert len(colours) > 20, "the screenshot is (nearly) one colour"
    assert (26, 127, 55) in colours, "the accepted marker's green is drawn"
    shutil.copyfile(png, tmp_path / "kept.png")


def _png_colours(png: Path) -> set[tuple[int, int, int]]:
    """Distinct RGB colours of an 8-bit RGB/RGBA non-interlaced PNG (what Chromium writes), via zlib + numpy."""
    import struct
    import zlib

    import numpy as np

    data = png.read_bytes()
    pos, chunks, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + length
    width, height, depth, ctype, _, _, interlace = header
    assert depth == 8 and ctype in (2, 6) and interlace == 0, header
    bpp = 3 if ctype == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(chunks)), dtype=np.uint8).reshape(height, stride + 1)
    img = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        ftype, line = int(raw[y, 0]), raw[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif ftype == 2:
            cur = line + prev
        else:  # average and paeth depend on the pixel to the left: byte by byte
            out, up, filt = [0] * stride, prev.tolist(), line.tolist()
            for x in range(stride):
                a = out[x - bpp] if x >= bpp else 0
                b = up[x]
                if ftype == 3:
                    out[x] = (filt[x] + (a + b) // 2) & 0xFF
                else:
                    c = up[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    out[x] = (filt[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            cur = np.array(out, dtype=np.uint8)
        img[y] = cur
        prev = cur
    pixels = img.reshape(height * width, bpp)[:, :3]
    return {tuple(int(v) for v in px) for px in np.unique(pixels, axis=0)}

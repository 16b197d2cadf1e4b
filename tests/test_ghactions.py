"""``pipemend ci`` end to end, offline: the real CLI in a subprocess, a fake GitHub REST server on
127.0.0.1 (``tests/fixtures/github_server.py``), a local bare repo as the remote, temp files for
``$GITHUB_OUTPUT``/``$GITHUB_STEP_SUMMARY``/the event, and real optimize runs of the tinyqa target
(the ladder proposer, the ``simulated/echo`` model, the process sandbox).

Two optimize runs are shared by the module: one that improves, one with nothing to accept. The resume
across jobs (a stopped job, then a fresh checkout) is ``slow``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import optimize_harness
from fixtures.github_server import FakeGitHub

# one xdist worker runs this module (.ci/run: --dist loadfile; the mark keeps it so under loadgroup), so its module-scoped runs are built once
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("ghactions")]

TOKEN = "ghs_fake_token"
REPO = "acme/widgets"
TARGET = "targets/tinyqa"
BRANCH = "pipemend/targets/tinyqa"
SRC = Path(__file__).resolve().parents[1] / "src"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


def read_outputs(path: Path) -> dict[str, str]:
    """``$GITHUB_OUTPUT`` as Actions reads it (the heredoc form); the last value of a name wins."""
    out: dict[str, str] = {}
    lines = path.read_text().split("\n") if path.exists() else []
    i = 0
    while i < len(lines):
        if "<<" in lines[i]:
            name, delim = lines[i].split("<<", 1)
            j = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:j])
            i = j
        i += 1
    return out


@dataclass
class Step:
    """One `pipemend ci` step: its exit code, stderr, outputs, step summary and the artifact folder."""

    rc: int
    stderr: str
    outputs: dict[str, str]
    summary: str
    artifact: Path

    def ci(self) -> dict:
        return json.loads((self.artifact / "ci.json").read_text())


def pipemend_ci(tmp: Path, repo: Path, args: list[str], *, event_name: str, event: dict, api_url: str,
                artifact: Path, extra_env: dict[str, str] | None = None, popen: bool = False) -> Step:
    """Run `python -m pipemend.cli ci ...` as an Actions step would, with fresh output files (``popen``: start
    it and return the process; ``finish(tmp, proc, artifact)`` then waits for it)."""
    tmp.mkdir(parents=True, exist_ok=True)
    event_path, out, summary = tmp / "event.json", tmp / "output.txt", tmp / "summary.md"
    event_path.write_text(json.dumps(event))
    for f in (out, summary):
        f.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY" and not k.startswith("GITHUB_")}
    env.update({"GITHUB_EVENT_PATH": str(event_path), "GITHUB_EVENT_NAME": event_name, "GITHUB_REPOSITORY": REPO,
                "GITHUB_API_URL": api_url, "GITHUB_SERVER_URL": "https://github.example", "GITHUB_RUN_ID": "4242",
                "GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_TOKEN": TOKEN,
                "PYTHONPATH": os.pathsep.join([str(SRC), *(extra_env or {}).get("PYTHONPATH", "").split(os.pathsep)])})
    env.update({k: v for k, v in (extra_env or {}).items() if k != "PYTHONPATH"})
    proc = subprocess.Popen([sys.executable, "-m", "pipemend.cli", "ci", *args], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc if popen else finish(tmp, proc, artifact)


def finish(tmp: Path, proc: subprocess.Popen, artifact: Path) -> Step:
    _, stderr = proc.communicate(timeout=540)
    return Step(proc.returncode, stderr, read_outputs(tmp / "output.txt"), (tmp / "summary.md").read_text(), artifact)


def optimize(tmp: Path, repo: Path, event_name: str, event: dict, *extra: str, api_url: str = "http://127.0.0.1:9",
             extra_env: dict[str, str] | None = None, popen: bool = False):
    artifact = tmp / "artifact"
    return pipemend_ci(tmp, repo, ["optimize", "--sandbox", "process", "--artifact-dir", str(artifact),
                                   "--state-dir", str(tmp.parent / "state"), *extra],
                       event_name=event_name, event=event, api_url=api_url, artifact=artifact, extra_env=extra_env,
                       popen=popen)


def fresh_clone(base_repo: Path, dest: Path) -> Path:
    """A new job's checkout: main only, none of the runs' branches."""
    subprocess.run(["git", "clone", "-q", "--single-branch", "--branch", "main", str(base_repo), str(dest)], check=True)
    return dest


def dispatch(**inputs: str) -> dict:
    return {"inputs": {"target": TARGET, **inputs}, "sender": {"login": "alice"}}


def comment(login: str, body: str, issue: int, *, pull: bool = False) -> dict:
    issue_obj: dict = {"number": issue}
    if pull:
        issue_obj["pull_request"] = {"url": "..."}
    return {"action": "created", "comment": {"body": body, "user": {"login": login}}, "issue": issue_obj,
            "sender": {"login": login}}


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory) -> Path:
    """The user's repository: tinyqa committed under targets/tinyqa, on main."""
    root = tmp_path_factory.mktemp("ci") / "repo"
    optimize_harness.make_repo(root)
    git(root, "branch", "-M", "main")
    return root


@pytest.fixture(scope="module")
def improved(base_repo, tmp_path_factory) -> Step:
    """A dispatch whose run accepts the ladder's `answer_style: short` (val 0 → 1)."""
    return optimize(tmp_path_factory.mktemp("improved") / "job", base_repo, "workflow_dispatch",
                    dispatch(**{"max-candidates": "3", "budget": "1"}), "--limit", "4")


@pytest.fixture(scope="module")
def nothing(base_repo, tmp_path_factory) -> Step:
    """A dispatch whose run proposes nothing (0 candidates), so nothing is accepted."""
    return optimize(tmp_path_factory.mktemp("nothing") / "job", base_repo, "workflow_dispatch",
                    dispatch(**{"max-candidates": "0", "budget": "1"}), "--limit", "4")


@dataclass
class World:
    gh: FakeGitHub
    remote: Path
    work: Path
    tmp: Path
    n: int = 0

    @property
    def repo(self):
        return self.gh.repos[REPO]

    def publish(self, artifact: Path) -> Step:
        self.n += 1
        return pipemend_ci(self.tmp / f"publish{self.n}", self.work, ["publish", str(artifact)],
                           event_name="workflow_dispatch", event=dispatch(), api_url=self.gh.url, artifact=artifact)

    def optimize(self, event_name: str, event: dict, *extra: str, extra_env: dict[str, str] | None = None) -> Step:
        self.n += 1
        return optimize(self.tmp / f"optimize{self.n}", self.work, event_name, event, *extra, api_url=self.gh.url,
                        extra_env=extra_env)

    def remote_branch(self) -> str | None:
        out = subprocess.run(["git", "-C", str(self.remote), "rev-parse", "--verify", "-q", f"refs/heads/{BRANCH}"],
                             capture_output=True, text=True)
        return out.stdout.strip() or None


@pytest.fixture()
def world(base_repo, tmp_path):
    """A fresh GitHub: a bare remote holding main, a checkout of it, and the fake REST API
    (alice may write, mallory only reads)."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    subprocess.run(["git", "clone", "-q", "--bare", "--single-branch", "--branch", "main", str(base_repo), str(remote)],
                   check=True)
    subprocess.run(["git", "clone", "-q", str(remote), str(work)], check=True)
    gh = FakeGitHub(TOKEN).start()
    gh.add_repo(REPO, remote, permissions={"alice": "write", "mallory": "read", "maya": "maintain"})
    yield World(gh, remote, work, tmp_path)
    gh.stop()


# ---------------------------------------------------------------------- the optimize job


def test_a_dispatch_that_improves_writes_the_artifact_outputs_and_summary(improved, base_repo):
    assert improved.rc == 0, improved.stderr
    assert improved.outputs["conclusion"] == "improved" and improved.outputs["best-delta"] == "+1.0000"
    assert improved.outputs["branch"] == BRANCH and improved.outputs["pr-url"] == ""
    ci = improved.ci()
    assert ci["format"] == "pipemend-ci-1" and ci["target"] == TARGET and ci["test_delta"] == 1.0
    art = improved.artifact
    report = (art / "report.md").read_text()
    assert report and report in improved.summary, "the step summary carries the report"
    assert json.loads((art / "summary.json").read_text())["best"]["val"] == 1.0
    assert (art / "run" / "journal.jsonl").is_file() and not (art / "run" / "worktrees").exists()
    patch = (art / "best.patch").read_text()
    assert f"a/{TARGET}/config.yaml" in patch and "+  style: short" in patch
    # the run's branches live in the repo, and a bundle of them is kept with the run directory for a resume
    run_id = ci["run_id"]
    assert git(base_repo, "rev-parse", f"pipemend/{run_id}/best")
    assert (improved.artifact.parent.parent / "state" / f"{run_id}.bundle").is_file()


def test_the_outputs_are_multiline_safe():
    from pipemend.ghactions import output_block

    value = "line one\nghadelimiter_x\nEOF"
    block = output_block("error", value)
    name, delim = block.split("\n", 1)[0].split("<<")
    assert name == "error" and delim not in value and block.endswith(f"\n{value}\n{delim}\n")


# ---------------------------------------------------------------------- publish


def test_publishing_an_improvement_opens_a_draft_pr_whose_body_is_the_report(world, improved):
    step = world.publish(improved.artifact)
    assert step.rc == 0, step.stderr
    [pr] = world.repo.pulls.values()
    assert pr["draft"] and pr["state"] == "open" and pr["base"]["ref"] == "main" and pr["head"]["ref"] == BRANCH
    report = (improved.artifact / "report.md").read_text()
    assert pr["body"].startswith(report) and "https://github.example/acme/widgets/actions/runs/4242" in pr["body"]
    assert step.outputs["pr-url"] == pr["html_url"] and step.outputs["conclusion"] == "improved"
    # the branch holds exactly the best candidate's change on top of main, and nothing under .github
    sha = world.remote_branch()
    assert sha and git(world.remote, "rev-parse", f"{sha}^") == git(world.remote, "rev-parse", "main")
    assert "style: short" in git(world.remote, "show", f"{sha}:{TARGET}/config.yaml")
    assert git(world.remote, "diff", "--name-only", "main", sha) == f"{TARGET}/config.yaml"
    [sticky] = world.repo.comments[pr["number"]]
    assert "<!-- pipemend:ci:sticky targets/tinyqa -->" in sticky["body"] and "+1.0000" in sticky["body"]
    assert pr["html_url"] in step.summary


def test_a_second_dispatch_updates_the_same_pr_and_keeps_one_sticky_comment(world, improved):
    assert world.publish(improved.artifact).rc == 0
    first_sha = world.remote_branch()
    world.repo.pulls[next(iter(world.repo.pulls))]["body"] = "edited by hand <!-- pipemend:ci:pr targets/tinyqa -->"
    # the target moved on main meanwhile: the branch is rebuilt on the new main and force-pushed
    (world.work / "NOTES.md").write_text("news\n")
    git(world.work, "add", "NOTES.md")
    git(world.work, "-c", "user.name=u", "-c", "user.email=u@u", "commit", "-q", "-m", "news")
    git(world.work, "push", "-q", "origin", "main")
    step = world.publish(improved.artifact)
    assert step.rc == 0, step.stderr
    assert len(world.repo.pulls) == 1, "the same PR is updated, not a second one opened"
    [pr] = world.repo.pulls.values()
    assert pr["body"].startswith((improved.artifact / "report.md").read_text())
    assert len(world.repo.comments[pr["number"]]) == 1, "one sticky comment, updated in place"
    second_sha = world.remote_branch()
    assert second_sha != first_sha and git(world.remote, "rev-parse", f"{second_sha}^") == git(world.remote, "rev-parse", "main")
    assert world.gh.requests.count(("POST", f"/repos/{REPO}/pulls")) == 1, "found by its marker, never created twice"


def test_a_pr_opened_by_hand_from_the_branch_is_updated_after_the_422(world, improved):
    assert world.publish(improved.artifact).rc == 0
    [pr] = world.repo.pulls.values()
    pr["body"] = "someone rewrote the body, marker gone"
    step = world.publish(improved.artifact)
    assert step.rc == 0, step.stderr
    assert len(world.repo.pulls) == 1 and "<!-- pipemend:ci:pr targets/tinyqa -->" in pr["body"]
    assert world.gh.requests.count(("POST", f"/repos/{REPO}/pulls")) == 2, "create, 422, then update"


def test_a_run_with_nothing_accepted_closes_the_pr_and_deletes_its_branch(world, improved, nothing):
    assert nothing.rc == 0, nothing.stderr
    assert nothing.outputs["conclusion"] == "no-improvement" and nothing.outputs["branch"] == ""
    assert not (nothing.artifact / "best.patch").exists()
    assert world.publish(improved.artifact).rc == 0 and world.remote_branch()
    step = world.publish(nothing.artifact)
    assert step.rc == 0, step.stderr
    [pr] = world.repo.pulls.values()
    assert pr["state"] == "closed" and world.remote_branch() is None
    [sticky] = world.repo.comments[pr["number"]]
    assert "Closed" in sticky["body"] and nothing.ci()["run_id"] in sticky["body"]
    assert "accepted no candidate" in step.summary and step.outputs["conclusion"] == "no-improvement"


# ---------------------------------------------------------------------- refusals and failures


def test_a_comment_from_a_user_without_write_access_is_refused(world):
    issue = world.gh.add_issue(REPO)
    step = world.optimize("issue_comment", comment("mallory", f"/pipemend optimize {TARGET} --budget 1", issue))
    assert step.rc == 1 and step.outputs["conclusion"] == "failed"
    ci = step.ci()
    assert ci["refused"] and "@mallory does not have write permission" in ci["error"] and ci["run_id"] is None
    assert ("GET", f"/repos/{REPO}/collaborators/mallory/permission") in world.gh.requests
    assert not (step.artifact.parent.parent / "state" / "reports").exists(), "no run was started"
    pub = world.publish(step.artifact)
    assert pub.rc == 1 and pub.outputs["conclusion"] == "failed"
    [reply] = world.repo.comments[issue]
    assert "refused" in reply["body"] and "@mallory" in reply["body"] and not world.repo.pulls


def test_a_comment_on_a_fork_pr_is_refused_even_from_a_writer(world):
    pr = world.gh.add_fork_pull(REPO, "eve/widgets")
    step = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET}", pr, pull=True))
    assert step.rc == 1 and step.ci()["refused"] and "fork" in step.ci()["error"]


def test_a_comment_asking_over_the_cap_or_for_a_plugin_is_refused(world):
    issue = world.gh.add_issue(REPO)
    over = world.optimize("issue_comment", comment("maya", f"/pipemend optimize {TARGET} --budget 500", issue))
    assert over.rc == 1 and over.ci()["refused"] and "over the workflow's cap" in over.ci()["error"]
    plugin = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET} --proposer x.y:Z", issue))
    assert plugin.rc == 1 and "a comment may name only" in plugin.ci()["error"]
    scripted = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET} --model scripted:/etc/x",
                                                       issue))
    assert scripted.rc == 1 and "never a scripted file" in scripted.ci()["error"]


def test_a_schedule_runs_the_steps_target_and_needs_one(world):
    step = world.optimize("schedule", {"schedule": "17 3 * * 1"}, "--target", TARGET, "--model", "claude-haiku-4-5")
    assert step.rc == 1 and step.ci()["target"] == TARGET and "ANTHROPIC_API_KEY" in step.ci()["error"]
    none = world.optimize("schedule", {"schedule": "17 3 * * 1"})
    assert none.rc == 1 and "no target" in none.ci()["error"]


def test_a_comment_without_the_command_is_skipped(world):
    step = world.optimize("issue_comment", comment("mallory", "thanks, looks good", world.gh.add_issue(REPO)))
    assert step.rc == 0 and step.outputs["conclusion"] == "skipped" and not world.gh.requests


def test_a_missing_api_key_fails_loudly_before_any_run(world):
    issue = world.gh.add_issue(REPO)
    step = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET} --model claude-haiku-4-5",
                                                   issue))
    assert step.rc == 1 and step.outputs["conclusion"] == "failed"
    assert "ANTHROPIC_API_KEY is not set" in step.ci()["error"] and "ANTHROPIC_API_KEY" in step.summary
    assert world.publish(step.artifact).rc == 1
    [reply] = world.repo.comments[issue]
    assert "ANTHROPIC_API_KEY" in reply["body"]


def test_a_crash_ends_in_a_failure_comment_and_exit_1(world, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "exploding_sandbox.py").write_text(
        "class Exploding:\n    def __init__(self, *a, **k):\n        raise RuntimeError('the sandbox exploded')\n")
    issue = world.gh.add_issue(REPO)
    step = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET}", issue),
                          "--sandbox", "exploding_sandbox:Exploding", extra_env={"PYTHONPATH": str(plugins)})
    assert step.rc == 1 and step.outputs["conclusion"] == "failed", step.stderr
    ci = step.ci()
    assert "RuntimeError: the sandbox exploded" in ci["error"] and not ci["refused"]
    assert ci["run_id"].startswith("optimize-") and step.outputs["run-id"] == ci["run_id"]
    assert json.loads((step.artifact / "run" / "run.json").read_text())["status"] == "failed", \
        "the failed run's directory is in the artifact"
    pub = world.publish(step.artifact)
    assert pub.rc == 1 and pub.outputs["conclusion"] == "failed"
    [reply] = world.repo.comments[issue]
    assert "failed" in reply["body"] and "the sandbox exploded" in reply["body"] and not world.repo.pulls
    # the next job asking for the same run resumes the unfinished one (from the cached state folder)...
    again = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET}", issue),
                           "--sandbox", "exploding_sandbox:Exploding", extra_env={"PYTHONPATH": str(plugins)})
    assert again.rc == 1 and again.ci()["run_id"] == ci["run_id"]
    journal = (again.artifact / "run" / "journal.jsonl").read_text()
    assert journal.count('"run_resumed"') == 1
    # ...and one asking for another run starts afresh
    other = world.optimize("issue_comment", comment("alice", f"/pipemend optimize {TARGET} --budget 2", issue),
                           "--sandbox", "exploding_sandbox:Exploding", extra_env={"PYTHONPATH": str(plugins)})
    assert other.rc == 1 and other.ci()["run_id"] not in (None, ci["run_id"])


def test_a_patch_touching_workflows_is_never_pushed(world, improved, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    ci = improved.ci()
    (art / "ci.json").write_text(json.dumps(ci))
    (art / "report.md").write_text("report")
    (art / "best.patch").write_text(
        "diff --git a/.github/workflows/evil.yml b/.github/workflows/evil.yml\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/.github/workflows/evil.yml\n@@ -0,0 +1 @@\n+on: push\n")
    step = world.publish(art)
    assert step.rc == 1 and step.outputs["conclusion"] == "failed"
    assert ".github/workflows" in step.summary and world.remote_branch() is None and not world.repo.pulls


def test_a_patch_making_a_symlink_is_never_pushed(world, improved, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "ci.json").write_text(json.dumps(improved.ci()))
    (art / "best.patch").write_text(
        f"diff --git a/{TARGET}/leak b/{TARGET}/leak\nnew file mode 120000\n--- /dev/null\n+++ b/{TARGET}/leak\n"
        "@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n")
    step = world.publish(art)
    assert step.rc == 1 and "symbolic link" in step.summary and world.remote_branch() is None


def test_a_bad_token_is_a_clear_error(world, improved):
    world.gh.token = "another"
    step = world.publish(improved.artifact)
    assert step.rc == 1 and "401 Bad credentials" in step.summary


def test_a_long_report_is_cut_to_githubs_limit_with_the_link_kept():
    from pipemend.ghactions.publish import BODY_LIMIT, pr_body

    body = pr_body("x" * 200_000, "https://example/artifact", TARGET)
    assert len(body) <= BODY_LIMIT and body.rstrip().endswith("-->") and "https://example/artifact" in body
    assert pr_body("short", "L", TARGET).startswith("short")


def test_the_comment_command_parses_flags():
    from pipemend.ghactions import parse_command
    from pipemend.ghactions.request import Ignored, Refused

    assert parse_command("/pipemend optimize target_pipelines/x --budget 3 --max-candidates=2\nplease") == {
        "target": "target_pipelines/x", "budget_usd": "3", "max_candidates": "2"}
    with pytest.raises(Ignored):
        parse_command("LGTM /pipemend optimize x")
    with pytest.raises(Refused, match="unknown option '--sandbox'"):
        parse_command("/pipemend optimize x --sandbox process")
    with pytest.raises(Refused, match="needs a value"):
        parse_command("/pipemend optimize x --budget")


@pytest.mark.slow  # two more optimize runs (one stopped, one resumed)
def test_a_job_stopped_mid_run_is_resumed_by_the_next_job_from_a_fresh_checkout(base_repo, tmp_path):
    """Cancelled (SIGINT, as Actions stops a job) after candidate 1 was kept: the next job, in a checkout with
    none of the run's commits, restores them from the cached bundle and finishes the same run."""
    request = dispatch(**{"max-candidates": "3", "budget": "1"})
    first = fresh_clone(base_repo, tmp_path / "checkout1")
    proc = optimize(tmp_path / "job1", first, "workflow_dispatch", request, "--limit", "4", popen=True)
    journals = tmp_path / "state" / "reports"
    deadline = time.monotonic() + 500
    while not any('"candidate_done"' in j.read_text() for j in journals.glob("*/journal.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before candidate 1 was done"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stopped = finish(tmp_path / "job1", proc, tmp_path / "job1" / "artifact")
    assert stopped.rc != 0 and stopped.outputs["conclusion"] == "failed" and "resumes it" in stopped.ci()["error"]
    run_id = stopped.ci()["run_id"]
    assert (tmp_path / "state" / f"{run_id}.bundle").is_file()

    second = fresh_clone(base_repo, tmp_path / "checkout2")
    assert not git(second, "for-each-ref", f"refs/heads/pipemend/{run_id}/")
    step = optimize(tmp_path / "job2", second, "workflow_dispatch", request, "--limit", "4")
    assert step.rc == 0, step.stderr
    ci = step.ci()
    assert ci["resumed"] and ci["run_id"] == run_id and ci["conclusion"] == "improved"
    journal = (step.artifact / "run" / "journal.jsonl").read_text()
    assert journal.count('"run_resumed"') == 1 and journal.count('"candidate_done"') >= 1
    assert "+  style: short" in (step.artifact / "best.patch").read_text()


def test_an_llm_proposer_needs_the_key_only_on_a_claude_agent_model(tmp_path):
    from pipemend.errors import RunFailed
    from pipemend.ghactions.optimize_job import check_api_key
    from pipemend.ghactions.request import CiRequest

    target = Path(__file__).parent / "fixtures" / "targets" / "tinyqa"  # its pipeline calls simulated/echo

    def request(proposer: str, agent_model: str | None = None) -> CiRequest:
        return CiRequest(target="tinyqa", proposer=proposer, agent_model=agent_model, trigger="workflow_dispatch")

    check_api_key(request("reflect"), target, {})  # its default agent model is the local one
    check_api_key(request("claude", "local/qwen2.5-coder-1.5b-instruct"), target, {})
    check_api_key(request("ladder"), target, {})
    for req in (request("claude"), request("reflect", "claude-sonnet-4-5")):
        with pytest.raises(RunFailed, match=r"the (claude|reflect) proposer \(claude-sonnet-4-5\)"):
            check_api_key(req, target, {})
    check_api_key(request("claude"), target, {"ANTHROPIC_API_KEY": "sk-x"})

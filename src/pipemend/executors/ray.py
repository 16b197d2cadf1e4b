"""The Ray executor (extra ``pipemend[ray]``): each task runs the same sandboxed runner on a Ray node.

Host side (``RayExecutor``): the target folder's regular files (the candidate's checkout without its hidden
paths: the sealed data files, ``.git``, venvs) go into the object store once per batch as a tar; each task
gets the tar, its shard's input rows and the job's fields as plain data. ``ray.remote(max_retries=0)``:
retries are pipemend's own, per ``(candidate, example)`` (``ShardedBatch``), so a finished example is never
paid twice. Ray has no per-task timeout and a non-forced cancel can miss a running task (ray#32954,
ray#46157): the host waits with ``ray.wait`` up to each task's deadline and then ``ray.cancel(ref,
force=True)``; the sandbox inside gets the deadline plus ``INNER_GRACE_S`` as its wall clock, a backstop only.
A task whose sandbox is Docker asks for the custom resource ``pipemend_docker`` (``DOCKER_RESOURCE``), which
marks the nodes that have Docker (``ray start --resources '{"pipemend_docker": 1000}'``). Each task asks for
``num_cpus`` CPUs (``--ray-task-cpus``, default 1; a fraction for tasks that mostly wait on a model). Before any
task, ``check_cluster`` refuses (``UsageError``) a cluster where no node could run one (no ``pipemend_docker``
for a Docker run, fewer CPUs than asked): Ray would keep such tasks pending forever.

Node side (``run_shard``): unpack the tar into a temporary folder (``tarfile``'s ``data`` filter: regular
files and folders only, nothing outside), pick the sandbox (``auto``: Docker where the node has it, else
bubblewrap), run the job, and return the results rows and trace files as data (``TaskOutput.to_wire``).
The host takes them in through ``TaskOutput.checked`` (ids, names, size caps), as ``sandbox/ingest.py`` does.

The gateway: where the host's socket is on the node (the same machine), the sandbox gets it as always;
elsewhere a process sandbox dials the gateway's URL, and Docker or bubblewrap (no network inside) get a unix
socket served by ``GatewayRelay`` in the task, which forwards each request to that URL. The URL carries the
run's gateway token (``GatewayConfig.token``): see docs/distributed.md. A gateway listening on every interface
(``--gateway-host 0.0.0.0``) is dialled at the driver's address as Ray knows it (``ray.util.get_node_ip_address``).
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import os
import shutil
import socketserver
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import ray

from ..errors import UsageError
from ..globs import walk_files
from ..protocols import SandboxJob
from ..sandbox import get_sandbox
from ..sandbox.common import masked_paths, target_dir
from . import is_loopback
from .base import ShardedBatch, ShardedExecutor, Task, TaskOutput, read_task_output
from .local import run_never_raising

DOCKER_RESOURCE = "pipemend_docker"
"""The custom resource that marks Ray nodes with a working Docker (each task asks for a sliver of it)."""
INNER_GRACE_S = 30.0
"""Seconds past a task's deadline the sandbox on the node may still run (the host has cancelled it by then)."""
SKIP_PARTS = frozenset({".git", ".venv", "venv", "__pycache__", "node_modules"})
TAR_CAP = 512 * 1024 * 1024
"""Largest target folder shipped to the nodes (bytes, uncompressed)."""
RELAY_BODY_CAP = 32 * 1024 * 1024
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
"""Gateway hosts meaning every interface: a URL that names one is dialled at the driver's address instead."""
TARS_KEPT = 16
"""Batches whose target tar the driver keeps in the object store for their tasks and retries."""


def target_tar(job: SandboxJob) -> bytes:
    """The target folder's regular files as a tar, without the job's hidden paths (labels) and ``SKIP_PARTS``."""
    root = target_dir(job).resolve()
    worktree = job.worktree.resolve()
    hidden = {worktree / m.rel for m in masked_paths(job)} | {root / h for h in job.hidden}
    buf = io.BytesIO()
    size = 0
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel in walk_files(root):
            path = root / rel
            if SKIP_PARTS & set(Path(rel).parts) or any(h == path or h in path.parents for h in hidden):
                continue
            size += path.stat().st_size
            if size > TAR_CAP:
                raise ValueError(f"target folder {root} is over {TAR_CAP} bytes: too big to ship to Ray nodes")
            info = tar.gettarinfo(str(path), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644 | (0o111 if info.mode & 0o100 else 0)
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def job_spec(job: SandboxJob, sandbox_kind: str, wall_timeout_s: float) -> dict[str, Any]:
    """What a node needs of a job, as plain data (paths on the host become names relative to the target)."""
    requirements = None
    if job.requirements is not None:
        try:
            requirements = Path(job.requirements).resolve().relative_to(target_dir(job).resolve()).as_posix()
        except ValueError:
            requirements = None
    return {
        "sandbox": sandbox_kind, "entrypoint": job.entrypoint, "gateway_url": job.gateway_url,
        "gateway_socket": str(job.gateway_socket) if job.gateway_socket else None, "model": job.model,
        "concurrency": job.concurrency, "example_timeout_s": job.example_timeout_s, "wall_timeout_s": wall_timeout_s,
        "env": dict(job.env), "requirements": requirements, "hidden": list(job.hidden),
    }


def check_cluster(nodes: list[dict[str, float]], sandbox_kind: str, num_cpus: float) -> None:
    """A ``UsageError`` when no node (``nodes``: each live node's total resources) could ever run a task asking
    for ``num_cpus`` CPUs (and, for ``--sandbox docker``, the resource ``DOCKER_RESOURCE``): Ray would keep such
    a task pending forever. A cluster that grows nodes on demand (an autoscaler) must keep one of each kind up."""
    fits = [n for n in nodes if n.get(DOCKER_RESOURCE)] if sandbox_kind == "docker" else nodes
    if not fits:
        raise UsageError(
            f"--sandbox docker: no node of the Ray cluster ({len(nodes)} node(s)) has the custom resource "
            f"{DOCKER_RESOURCE}, which marks the nodes with Docker, so every task would wait forever. Start each "
            f"node that has Docker with ray start --address HEAD:6379 --resources '{{\"{DOCKER_RESOURCE}\": 1000}}' "
            "(docs/distributed.md), or run with --sandbox bwrap (bubblewrap on the nodes) or --sandbox auto")
    most = max(float(n.get("CPU") or 0) for n in fits)
    if num_cpus > most:
        where = f"with {DOCKER_RESOURCE} " if sandbox_kind == "docker" else ""
        raise UsageError(
            f"--ray-task-cpus {num_cpus:g}: no node {where}of the Ray cluster has that many CPUs (the largest has "
            f"{most:g}), so every task would wait forever: ask for at most {most:g} (a fraction such as 0.25 suits "
            "tasks that mostly wait on a model)")


def with_host(url: str, host: str) -> str:
    """``url`` with its host replaced by ``host`` (port, path and token kept)."""
    parts = urlsplit(url)
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


# --------------------------------------------------------------------------- on the node


class GatewayRelay:
    """A unix socket on the node that forwards each HTTP request to the gateway's URL (its token in the path).

    It runs in the Ray task, outside the sandbox; the sandbox sees only the socket, as it would the host's."""

    def __init__(self, path: Path, gateway_url: str):
        parts = urlsplit(gateway_url)
        host, port, prefix = parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def address_string(self) -> str:
                return "relay"

            def _forward(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                if n < 0 or n > RELAY_BODY_CAP or self.headers.get("transfer-encoding"):
                    self.send_error(413)
                    return
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection(host, port, timeout=600)
                try:
                    conn.request(self.command, prefix + self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                except OSError as e:
                    self.send_error(502, f"gateway unreachable: {e}")
                    return
                finally:
                    conn.close()
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

        self.path = Path(path)
        self.server = Server(str(self.path), Handler)
        os.chmod(self.path, 0o666)  # the sandbox runs as another uid
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_shard(tar: bytes, lines: list[str], ids: list[str], spec: dict[str, Any]) -> dict[str, Any]:
    """One task on a node: unpack the target, run the sandboxed runner on ``lines``, return its output as data."""
    tmp = Path(tempfile.mkdtemp(prefix="pipemend-ray-"))
    relay = None
    try:
        os.chmod(tmp, 0o711)
        work = tmp / "work"
        work.mkdir()
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r") as archive:
            archive.extractall(work, filter="data")
        for dirpath, _dirs, _files in os.walk(work):  # the sandbox user reads the tree
            os.chmod(dirpath, 0o755)
        (tmp / "in").mkdir()
        inputs = tmp / "in" / "inputs.jsonl"
        inputs.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.chmod(inputs, 0o644)
        kind = spec["sandbox"]
        sandbox = get_sandbox(kind, announce=lambda msg: None)
        socket = spec.get("gateway_socket")
        if socket is None or not Path(socket).is_socket():
            socket = None
            if getattr(sandbox, "name", "") != "process":
                # in a folder only the task's user may pass (``tmp`` is 0711 for the sandbox user): no other
                # user of the node reaches the gateway through the relay; the sandbox gets the socket mounted
                private = tmp / "relay"
                private.mkdir(mode=0o700)
                relay = GatewayRelay(private / "gateway.sock", spec["gateway_url"])
                socket = str(relay.path)
        job = SandboxJob(
            worktree=work, target_subdir="", entrypoint=spec["entrypoint"], inputs_file=inputs, out_dir=tmp / "out",
            gateway_url=spec["gateway_url"], gateway_socket=Path(socket) if socket else None, model=spec["model"],
            concurrency=spec["concurrency"], example_timeout_s=spec["example_timeout_s"],
            wall_timeout_s=spec["wall_timeout_s"], env=spec["env"], hidden=spec["hidden"],
            requirements=work / spec["requirements"] if spec.get("requirements") else None)
        outcome = run_never_raising(sandbox, job)
        return read_task_output(job.out_dir, ids, outcome).to_wire()
    finally:
        if relay is not None:
            relay.close()
        shutil.rmtree(tmp, ignore_errors=True)


_remote_run_shard = ray.remote(max_retries=0)(run_shard)


# --------------------------------------------------------------------------- on the host


@dataclass
class _Ref:
    task: Task
    ref: Any


class RayTasks:
    """``TaskRunner`` of Ray tasks (``run_shard``); cancelled with ``ray.cancel(force=True)``."""

    host_grace_s = 0.0
    name = "ray"

    def __init__(self, sandbox_kind: str, num_cpus: float = 1.0):
        self.sandbox_kind, self.num_cpus = sandbox_kind, num_cpus
        self._tars: dict[int, tuple[SandboxJob, Any]] = {}
        """id(batch job) -> (the job, kept so its id is not reused; its tar's object ref)."""
        self._lock = threading.Lock()

    def _tar(self, job: SandboxJob) -> Any:
        """The object ref of ``job``'s target tar, put once per batch (several batches may run at once)."""
        with self._lock:
            if id(job) not in self._tars:
                self._tars[id(job)] = (job, ray.put(target_tar(job)))
                while len(self._tars) > TARS_KEPT:
                    self._tars.pop(next(iter(self._tars)))
            return self._tars[id(job)][1]

    def start(self, task: Task) -> _Ref:
        resources = {DOCKER_RESOURCE: 0.001} if self.sandbox_kind == "docker" else {}
        spec = job_spec(task.job, self.sandbox_kind, task.timeout_s + INNER_GRACE_S)
        ref = _remote_run_shard.options(num_cpus=self.num_cpus, resources=resources, max_retries=0).remote(
            self._tar(task.job), task.lines, task.ids, spec)
        return _Ref(task, ref)

    def ready(self, handles: list[_Ref], timeout: float) -> list[_Ref]:
        refs = [h.ref for h in handles]
        first, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not first:
            return []
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        order = list(dict.fromkeys(r.hex() for r in [*first, *done]))  # Ray tells only which came first
        by_hex = {h.ref.hex(): h for h in handles}
        return [by_hex[x] for x in order if x in by_hex]

    def output(self, handle: _Ref) -> TaskOutput:
        return TaskOutput.checked(ray.get(handle.ref), handle.task.ids, sandbox=self.sandbox_kind)

    def cancel(self, handle: _Ref) -> None:
        try:
            ray.cancel(handle.ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass

    def live(self, handle: _Ref) -> int:
        return 0


class RayExecutor(ShardedExecutor):
    """``Executor`` on a Ray cluster (``ShardedExecutor``): ``max_retries`` per example whose task died (a lost
    node, a killed worker); connects with ``ray.init(address)`` unless Ray is already initialised."""

    name = "ray"

    def __init__(self, *, sandbox_kind: str = "auto", address: str | None = None, shard_size: int | None = None,
                 max_retries: int = 2, num_cpus: float = 1.0, announce: Callable[[str], None] = print):
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            check_cluster([n.get("Resources") or {} for n in nodes], sandbox_kind, num_cpus)
        except BaseException:
            self._shutdown()
            raise
        docker = sum(1 for n in nodes if (n.get("Resources") or {}).get(DOCKER_RESOURCE))
        self.driver_ip = ray.util.get_node_ip_address()
        """This machine's address as the cluster sees it: what a gateway on every interface is dialled at."""
        self.remote_nodes = sum(1 for n in nodes if n.get("NodeManagerAddress") != self.driver_ip)
        """Live nodes other than this machine: they reach the gateway only over the network."""
        announce(f"executor: ray ({len(nodes)} node(s), {docker} with {DOCKER_RESOURCE}; sandbox {sandbox_kind}, "
                 f"{num_cpus:g} CPU(s) a task)")
        super().__init__(RayTasks(sandbox_kind, num_cpus), shard_size=shard_size, max_retries=max_retries,
                         max_running=None)
        self.announce, self._warned = announce, False

    def submit(self, job: SandboxJob, *, candidate: str, timeout_s: float | None = None) -> ShardedBatch:
        host = urlsplit(job.gateway_url).hostname or ""
        if host in WILDCARDS:  # listening on every interface: the nodes dial this machine's address
            job = dataclasses.replace(job, gateway_url=with_host(job.gateway_url, self.driver_ip))
        elif self.remote_nodes and is_loopback(host) and not self._warned:
            self._warned = True
            self.announce(f"executor: the gateway listens on {host}, which the cluster's {self.remote_nodes} other "
                          "node(s) cannot reach unless a tunnel carries it there: their tasks' model calls fail "
                          "(pass --gateway-host, docs/distributed.md)")
        return super().submit(job, candidate=candidate, timeout_s=timeout_s)

    def close(self) -> None:
        super().close()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._started:
            ray.shutdown()
            self._started = False


__all__ = ["DOCKER_RESOURCE", "GatewayRelay", "RayExecutor", "RayTasks", "check_cluster", "run_shard", "target_tar",
           "with_host"]

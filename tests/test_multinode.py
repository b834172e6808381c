"""A real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`), the whole
pipeline submitted with `ray job submit`: the teach stage starts the teacher as a cluster service on the
head and its actor calls it from the worker node; the worker node is killed while the backfill runs on it;
then `serve deploy serve_configs/recommend.yaml` (this run's config, a free port) answers on the same cluster.

Only processes of this cluster are touched: everything is found through the cluster's own temp dir and
ports, and killed by PID (never `ray stop`, which would kill every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from slim_ray.serve_app import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
FAULT_SERVER_COMMAND = [sys.executable, "-m", "slim_ray.fault_server", "--host", "{host}", "--port", "{port}",
                        "--no-faults"]  # stands in for llama.cpp: the same launch path, seconds instead of minutes


def _ports(names: list[str], used: set[int]) -> dict[str, int]:
    """Distinct free ports: the OS may hand the same just-released port to two probes in a row."""
    ports = {}
    for name in names:
        while (port := free_port()) in used:
            pass
        used.add(port)
        ports[name] = port
    return ports


def _start_node(args: list[str], env: dict) -> None:
    done = subprocess.run([RAY, "start", "--disable-usage-stats", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"ray start {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _kill_tree(proc: psutil.Process) -> None:
    for p in [proc, *proc.children(recursive=True)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _processes_with(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(text in part for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


def _serve_config(root: Path, config: Path, port: int) -> Path:
    """serve_configs/recommend.yaml as a user would edit it: this run's pipeline config and the model its
    index stage published (the SLIM one), a free port."""
    spec = yaml.safe_load((REPO / "serve_configs" / "recommend.yaml").read_text())
    spec["http_options"] = {"host": "127.0.0.1", "port": port}
    spec["applications"][0]["args"].update(config=str(config), overrides=["train.fusion=slim"])
    path = root / "recommend.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _answer(url: str, user: str, deadline: float, dashboard: str, env: dict) -> dict:
    """The first 200 answer to a known user's request, polling while the deployed application starts."""
    import httpx

    last = None
    while time.time() < deadline:
        try:
            last = httpx.post(f"{url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=30)
            if last.status_code == 200:
                return last.json()
        except httpx.HTTPError as error:
            last = error
        time.sleep(2)
    status = subprocess.run([str(Path(sys.executable).with_name("serve")), "status", f"--address={dashboard}"],
                            env=env, capture_output=True, text=True, timeout=60).stdout
    raise AssertionError(f"serve deploy never answered: {last!r} {getattr(last, 'text', '')[:500]}\n{status[-3000:]}")


def _pipeline_config(root: Path, student: str, teacher_url: str) -> Path:
    run = {
        "run": {"output_dir": str(root / "run")},
        "ray": {"object_store_memory_mb": 100},
        "data": {"interactions": str(root / "r.inter"), "items": str(root / "r.item")},
        "train": {"epochs": 1, "batch_size": 32, "eval_negatives": 10, "cpus_per_worker": 1,
                  "model": {"hidden_size": 16, "inner_size": 32, "n_layers": 1}},
        # The stage starts the teacher itself (launch_local) as a cluster service: a TeacherService actor
        # that takes the head's 2 CPUs, so the teacher actor runs on the worker node and calls across.
        "teacher": {"base_url": teacher_url, "model": "fault-model", "launch_local": True,
                    "server_command": FAULT_SERVER_COMMAND, "server_threads": 2, "num_samples": 24,
                    "n_candidates": 5, "candidates": "backbone", "num_actors": 1, "concurrency": 4, "timeout_s": 5},
        # One student, not one per fold: cross-fitting has its own tests, and this one is about the cluster.
        "distill": {"base_model": student, "cross_fit": False, "strategy": "ddp", "epochs": 1, "batch_size": 4, "cpus_per_worker": 1,
                    "eval_users": 4, "max_new_tokens": 16},
        # Two student actors of one CPU on two nodes of two CPUs (Ray Data spreads them): one is on the
        # worker node when it dies, and the head has room to restart it.
        "backfill": {"engine": "hf", "max_new_tokens": 48, "batch_size": 2, "num_actors": 2, "cpus_per_actor": 1},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


@pytest.mark.slow
def test_pipeline_job_on_two_nodes_survives_losing_the_worker_node(tmp_path, tiny_student, monkeypatch):
    from conftest import write_ring
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    write_ring(tmp_path, "r", users=40, n_items=30, seed=3)
    # Short paths (Ray's socket paths have a length limit), one per node: nodes on one machine sharing a
    # temp dir would share runtime_resources/, and one node's cleanup would delete the other's job files.
    temp_dirs = [tempfile.mkdtemp(prefix="srmn", dir="/tmp") for _ in range(2)]
    used: set[int] = set()
    head = _ports(["port", "dashboard", "client", "agent", "agent_grpc", "metrics", "runtime_env", "teacher", "serve"], used)
    worker = _ports(["node_manager", "agent", "agent_grpc", "metrics", "runtime_env"], used)
    # A loopback-only test cluster: no token auth (a real cluster keeps Ray's token auth on and ships
    # the token to every node and client).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    dashboard = f"http://127.0.0.1:{head['dashboard']}"
    try:
        _start_node(["--head", "--node-ip-address=127.0.0.1", f"--port={head['port']}", "--num-cpus=2",
                     f"--temp-dir={temp_dirs[0]}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={head['dashboard']}", f"--ray-client-server-port={head['client']}",
                     f"--dashboard-agent-listen-port={head['agent']}", f"--dashboard-agent-grpc-port={head['agent_grpc']}",
                     f"--metrics-export-port={head['metrics']}", f"--runtime-env-agent-port={head['runtime_env']}",
                     "--object-store-memory=150000000"], env)
        _start_node([f"--address=127.0.0.1:{head['port']}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                     f"--temp-dir={temp_dirs[1]}",
                     f"--node-manager-port={worker['node_manager']}", f"--dashboard-agent-listen-port={worker['agent']}",
                     f"--dashboard-agent-grpc-port={worker['agent_grpc']}", f"--metrics-export-port={worker['metrics']}",
                     f"--runtime-env-agent-port={worker['runtime_env']}", "--object-store-memory=150000000"], env)
        nodes = list_nodes(address=dashboard)
        assert len([n for n in nodes if n.state == "ALIVE"]) == 2
        worker_node = next(n.node_id for n in nodes if not n.is_head_node)

        config = _pipeline_config(tmp_path, tiny_student[0], f"http://127.0.0.1:{head['teacher']}/v1")
        # Ray Data provisions a pool's actors asynchronously: without the wait, a slow-starting actor on the
        # worker node can find the head's actor already done with every batch, and there is nothing to kill.
        runtime_env = {"excludes": [".git", ".venv", "runs", "bench", ".bench-venv-recbole"],
                       "env_vars": {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}}
        job_id = f"slim-ray-pipeline-{os.getpid()}"
        subprocess.run(
            [RAY, "job", "submit", f"--address={dashboard}", "--no-wait", f"--submission-id={job_id}",
             f"--working-dir={REPO}",
             f"--runtime-env-json={json.dumps(runtime_env)}", "--",
             sys.executable, "-m", "jobs.pipeline", "--config", str(config)],
            env=env, check=True, capture_output=True, text=True, timeout=120)
        client = JobSubmissionClient(dashboard)
        backfill_out = tmp_path / "run" / "backfill" / "rationales.parquet"

        killed_mid_backfill, deadline, seen = False, time.time() + 600, {}
        while time.time() < deadline and client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING):
            students = [a for a in list_actors(address=dashboard, limit=10000) if "StudentActor" in a.class_name]
            for a in students:  # (node, state) history of every student actor, for the failure message
                history = seen.setdefault(a.actor_id, [])
                now = ("worker" if a.node_id == worker_node else "head", a.state)
                if not history or history[-1][1:] != now:
                    history.append((round(time.time() - deadline + 600, 1), *now))
            if any(a.state == "ALIVE" and a.node_id == worker_node for a in students) and not killed_mid_backfill:
                assert not backfill_out.exists()
                raylets = [p for p in _processes_with(f"--node_manager_port={worker['node_manager']}")
                           if "raylet" in p.name()]
                assert len(raylets) == 1
                _kill_tree(raylets[0])  # the node and every worker process on it
                killed_mid_backfill = True
            time.sleep(0.3)
        status, logs = client.get_job_status(job_id), client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert killed_mid_backfill, f"the backfill never ran an actor on the worker node: {seen}"
        actors = list_actors(address=dashboard, limit=10000)
        services = [a for a in actors if a.class_name == "TeacherService"]
        teachers = [a for a in actors if "TeacherActor" in a.class_name]
        assert len(services) == 1 and services[0].state == "DEAD"  # stopped with its stage
        assert teachers and all(a.node_id == worker_node != services[0].node_id for a in teachers)
        assert not any(n.state == "ALIVE" for n in list_nodes(address=dashboard) if n.node_id == worker_node)

        rows = pd.read_parquet(backfill_out)
        users = pd.read_parquet(tmp_path / "run" / "prepared" / "sequences.parquet")["user_id"]
        ledger = json.loads((tmp_path / "run" / "teacher" / "ledger.json").read_text())
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        # every (user, split prefix) exactly once, every user present
        assert not rows.duplicated(["user_id", "split"]).any() and set(rows["user_id"]) == set(users)
        assert len(rows) == 3 * len(users)  # train, valid and test prefixes (6-item ring histories)
        assert ledger["candidates"] == "backbone" and ledger["rationales"] == 24  # grounded by the trained SASRec
        assert list(manifest["stages"])[-1] == "serve-demo" and not any(s["skipped"] for s in manifest["stages"].values())
        assert manifest["stages"]["serve-demo"]["result"]["known user"]["status"] == 200
        assert "serve-demo" in logs and (tmp_path / "run" / "report" / "report.md").is_file()
        assert (tmp_path / "run" / "report" / "metrics.png").is_file()

        # The production path on the same cluster: `serve deploy serve_configs/recommend.yaml`, pointed at this
        # run's config and at a free port (8000 may be taken on a shared machine), answers a known user.
        serve_port, deploy_start = head["serve"], time.time()
        subprocess.run([str(Path(sys.executable).with_name("serve")), "deploy", f"--address={dashboard}",
                        str(_serve_config(tmp_path, config, serve_port))],
                       env=env, check=True, capture_output=True, text=True, timeout=120)
        known_user = str(pd.read_parquet(tmp_path / "run" / "prepared" / "sequences.parquet")["raw_user_id"].iloc[0])
        answer = _answer(f"http://127.0.0.1:{serve_port}", known_user, time.time() + 240, dashboard, env)
        serve_deploy_s = time.time() - deploy_start
        assert answer["items"] and answer["rationale_source"] == "cached"
        if os.environ.get("SLIM_RAY_MULTINODE_REPORT"):  # bench/multinode.py runs this scenario and reports it
            Path(os.environ["SLIM_RAY_MULTINODE_REPORT"]).write_text(json.dumps({
                "rows_expected": 3 * len(users), "rows_written": len(rows),
                "duplicate_rows": int(rows.duplicated(["user_id", "split"]).sum()),
                "teacher_actors_on_worker": sum(a.node_id == worker_node for a in teachers),
                "teacher_service_on_worker": services[0].node_id == worker_node,
                # every request of the stage came from its actors, all on the worker node (asserted above)
                "teacher_requests_from_worker": ledger["requests"] if all(a.node_id == worker_node for a in teachers) else 0,
                "killed_node": killed_mid_backfill, "job_status": str(status),
                "stage_wall_s": {k: v["wall_s"] for k, v in manifest["stages"].items()},
                "serve_deploy_answered": True, "serve_deploy_s": round(serve_deploy_s, 1)}, indent=2))
    finally:
        for temp_dir in temp_dirs:
            for proc in _processes_with(temp_dir):
                _kill_tree(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)

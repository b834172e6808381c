"""The 2-node scenario of tests/test_multinode.py, run and reported as a benchmark.

  python bench/multinode.py

A real 2-node Ray cluster on this machine (`ray start --head` + `ray start --address`), the whole pipeline
submitted with `ray job submit`: the teach stage starts the teacher as a cluster service and its actor
calls it from the worker node; the worker node is killed while the backfill runs on it; then
`serve deploy serve_configs/recommend.yaml` (this run's config, a free port) answers a known user on the
same cluster. The scenario is the test itself
(run here through pytest, so the two can never drift apart); it writes its measurements to a file this
script publishes. Writes bench/results/multinode.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish  # noqa: E402

TEST = "tests/test_multinode.py::test_pipeline_job_on_two_nodes_survives_losing_the_worker_node"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "multinode.json"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST], cwd=ROOT,
                              env={**os.environ, "SLIM_RAY_MULTINODE_REPORT": str(report)}, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if not report.is_file():
            sys.exit(f"the scenario did not finish (pytest exit {done.returncode}):\n{done.stdout[-4000:]}")
        summary = json.loads(report.read_text())
    summary.update(scenario_passed=done.returncode == 0, scenario_wall_s=round(wall, 1))
    summary["bar_met"] = (summary["rows_written"] == summary["rows_expected"] and summary["duplicate_rows"] == 0
                          and summary["killed_node"] and summary["teacher_requests_from_worker"] > 0
                          and summary["serve_deploy_answered"])
    stages = summary["stage_wall_s"]
    table = "\n".join(["| stage | wall s |", "|---|---:|", *(f"| {k} | {v:.1f} |" for k, v in stages.items())])
    notes = (f"Rows: {summary['rows_written']} written of {summary['rows_expected']} expected, "
             f"{summary['duplicate_rows']} duplicates, with the worker node killed mid-backfill: {summary['killed_node']}. "
             f"Teacher: a TeacherService actor on the {'worker' if summary['teacher_service_on_worker'] else 'head'} node, "
             f"{summary['teacher_actors_on_worker']} teacher actor(s) on the worker node sending "
             f"{summary['teacher_requests_from_worker']} requests across nodes. `serve deploy` of the recommend app on "
             f"the same cluster answered a known user {summary['serve_deploy_s']:.0f} s after the deploy command. Bar "
             f"(every row exactly once, the node killed, requests from the worker, the deployed app answers): {'met' if summary['bar_met'] else 'NOT met'}; every assertion of the test: "
             f"{'passed' if summary['scenario_passed'] else 'FAILED'}. Both nodes run on this one machine (2 CPUs each "
             f"declared on 2 real cores), with the ring dataset, a tiny random student and the fault server standing in "
             f"for llama.cpp (the same launch path): the stage times measure the orchestration, not model speed. "
             f"Scenario wall time {summary['scenario_wall_s']:.0f} s, including cluster start and teardown.")
    publish("multinode", "Two-node cluster: teacher service, node loss (local)", {"summary": summary},
            table, notes)


if __name__ == "__main__":
    main()

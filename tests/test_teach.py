"""Teacher stage against a real fault-injecting HTTP server on 127.0.0.1 and a local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slim_ray.config import load_config
from slim_ray.errors import DataError
from slim_ray.fault_server import FaultServer
from slim_ray.llm_api import ChatCaller, ResponseCache, TokenBucketLimiter
from slim_ray.models import build_backbone
from slim_ray.prepare import run_prepare
from slim_ray.storage import load_prepared
from slim_ray.candidates import checkpoint_candidates, fold_model_name, top_unseen
from slim_ray.storage import load_rationales
from slim_ray.teach import build_requests, run_teach, teach_checkpoints

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Candidate movies:\n- Heat\n- Casino"}]


def _caller(server: FaultServer, tmp_path: Path, **kw) -> ChatCaller:
    return ChatCaller(server.base_url, "fault-model", "sk-test", timeout_s=0.5, max_retries=3,
                      backoff_base_s=0.01, backoff_max_s=0.05, cache=ResponseCache(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("script, reasons, ok", [
    ([], [], True),
    (["429"], ["rate_limited"], True),
    (["500", "500"], ["http_500", "http_500"], True),
    (["slow"], ["timeout"], True),
    (["malformed"], ["malformed_response"], True),
    (["down"], ["http_500"] * 3, False),
])
def test_retries_classify_each_fault(tmp_path, script, reasons, ok):
    with FaultServer(scripts=[script], slow_s=1.5, retry_after_s=0.3) as server:
        start = time.perf_counter()
        result = _caller(server, tmp_path).call(MESSAGES, "k1", max_tokens=32, temperature=0)
        elapsed = time.perf_counter() - start
    assert result.retry_reasons == reasons and result.retries == len(reasons)
    assert (result.text is not None) == ok and (result.error is None) == ok
    if not ok:
        assert result.error == "http_500" and result.attempts == 4  # 1 + max_retries
    if script == ["429"]:
        assert elapsed >= 0.3  # Retry-After honoured over the shorter backoff
    if ok:
        assert "Step 3: Heat, Casino" in result.text and result.completion_tokens > 0


def test_our_own_bugs_are_not_retried_as_malformed_responses_and_jitter_differs_per_caller(tmp_path):
    from slim_ray.llm_api import classify

    assert classify(ValueError("empty completion")) == ("malformed_response", True)
    assert classify(TypeError("'NoneType' object is not subscriptable")) == ("TypeError", False)
    assert classify(AttributeError("x")) == ("AttributeError", False)
    draws = {tuple(ChatCaller("http://127.0.0.1:9/v1", "m", "k").rng.random() for _ in range(3)) for _ in range(4)}
    assert len(draws) == 4  # four actors' backoffs after the same 429 are not in lockstep


def test_cache_hit_sends_nothing(tmp_path):
    with FaultServer(scripts=[[]]) as server:
        first = _caller(server, tmp_path).call(MESSAGES, "same-key", max_tokens=32, temperature=0)
        again = _caller(server, tmp_path).call(MESSAGES, "same-key", max_tokens=32, temperature=0)
        assert sum(server.stats()["requests"].values()) == 1
    assert again.from_cache and again.attempts == 0 and again.text == first.text


def test_token_bucket_lets_a_burst_through_then_spaces_requests_at_the_rate():
    limiter = TokenBucketLimiter(requests_per_min=600, tokens_per_min=None, burst_s=0.5)  # 10/s, bucket of 5
    waits = [limiter.reserve(10) for _ in range(8)]
    assert waits[:5] == pytest.approx([0] * 5, abs=0.01)  # a burst of 5 goes out at once
    assert waits[5:] == pytest.approx([0.1, 0.2, 0.3], abs=0.02)  # then one per 0.1 s
    tokens = TokenBucketLimiter(None, tokens_per_min=6000, burst_s=1.0)  # 100 tokens per second, bucket of 100
    assert tokens.reserve(80) == pytest.approx(0, abs=0.01)
    assert tokens.reserve(70) == pytest.approx(0.5, abs=0.02)  # 20 left: 50 tokens of debt
    both = TokenBucketLimiter(requests_per_min=60, tokens_per_min=6000, burst_s=1.0)  # the slower bucket rules
    assert both.reserve(10) == pytest.approx(0, abs=0.01) and both.reserve(10) == pytest.approx(1.0, abs=0.02)


def _teach_overrides(root: Path, server: FaultServer, name: str) -> list[str]:
    return [f"data.interactions={root / 'r.inter'}", f"data.items={root / 'r.item'}",
            f"run.output_dir={root / name}", "ray.object_store_memory_mb=100",
            f"teacher.base_url={server.base_url}", "teacher.model=fault-model", "teacher.num_samples=36",
            "teacher.timeout_s=0.5", "teacher.max_retries=3", "teacher.backoff_base_s=0.01",
            "teacher.backoff_max_s=0.05", "teacher.num_actors=2", "teacher.concurrency=4",
            "teacher.batch_size=6", "teacher.n_candidates=5", "teacher.launch_local=false",
            "teacher.price_prompt_per_1k=0.5", "teacher.price_completion_per_1k=1.5"]


@pytest.mark.slow
def test_every_row_ends_as_rationale_or_failure_and_rerun_uses_cache(ring_dataset, shared_ray):
    with FaultServer(slow_s=1.5, retry_after_s=0.05) as server:
        cfg = load_config(None, _teach_overrides(ring_dataset, server, "run1"))
        run_prepare(cfg.data, cfg.prepared_dir)
        ledger = run_teach(cfg)
        results = load_rationales(cfg.run.output_dir / "teacher")
        assert len(results) == 36 and results["user_id"].is_unique
        assert (results["rationale"].notna() ^ results["error"].notna()).all()
        assert ledger["rationales"] + ledger["failures"] == 36 and ledger["failures"] > 0
        assert set(ledger["failures_by_reason"]) == {"http_500"}
        assert {"rate_limited", "http_500", "timeout", "malformed_response"} <= set(ledger["retries_by_reason"])
        truncated = results[results["finish_reason"] == "length"]
        assert len(truncated) > 0 and not truncated["parsed"].any()  # kept, flagged
        good = results[results["finish_reason"] == "stop"]
        assert good["parsed"].all() and (good["in_catalogue"] == 5).all()
        assert ledger["estimated_cost_usd"] > 0 and ledger["requests"] > 36

        sent_before = sum(server.stats()["requests"].values())
        again = run_teach(cfg)
        assert again["from_cache"] == ledger["rationales"]  # nothing paid twice
        assert again["rationales"] == ledger["rationales"]
        # only the failed rows went back to the server
        resent = sum(server.stats()["requests"].values()) - sent_before
        assert resent == again["requests"] == ledger["failures"] * 4
        assert max(server.stats()["successes"].values()) == 1


@pytest.mark.slow
def test_killed_run_resumes_without_recalling_cached_prompts(ring_dataset, shared_ray):
    with FaultServer(scripts=[[], ["slow"]], slow_s=0.4) as server:
        overrides = _teach_overrides(ring_dataset, server, "killed") + ["teacher.timeout_s=5", "teacher.num_actors=1",
                                                                         "teacher.concurrency=1"]
        cfg = load_config(None, overrides)
        run_prepare(cfg.data, cfg.prepared_dir)
        # A driver submitted to a running cluster, as `ray job submit` starts one: killing it ends its job
        # and the job's teacher actors. (A driver that starts its own Ray can miss Ray's fixed 30 s raylet
        # start-up limit on 2 busy cores, beside the other test worker's clusters.)
        cmd = [sys.executable, "-m", "slim_ray.cli", "teach", "--set", f"ray.address={shared_ray['address']}"]
        cmd += [a for o in overrides for a in ("--set", o)]
        # the shell of a user of the cluster: its auth mode (Ray's token, on by default), none of the other
        # variables of this process's session
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_AUTH_MODE"}
        log = ring_dataset / "killed_teach.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while sum(server.stats()["successes"].values()) < 8 and time.time() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, nothing else
        proc.wait()
        done_before = sum(server.stats()["successes"].values())
        assert 8 <= done_before < 36, f"the kill must land mid-run; the driver's output ended:\n{log.read_text()[-3000:]}"
        assert not (cfg.run.output_dir / "teacher").exists()  # nothing half-written

        ledger = run_teach(cfg)
        assert ledger["rationales"] == 36 and ledger["failures"] == 0
        assert ledger["from_cache"] >= done_before - 1  # a response in flight at the kill may be lost
        assert max(server.stats()["successes"].values()) <= 2
        assert sum(v == 2 for v in server.stats()["successes"].values()) <= 1
        assert json.loads((cfg.run.output_dir / "teacher" / "ledger.json").read_text()) == ledger


def _save_fold_model(cfg, fold: int, holdout_fold: int, n_items: int):
    """A real (untrained, seeded) SASRec exported like `slim-ray train-folds` exports one."""
    torch.manual_seed(fold)
    kwargs = {"hidden_size": 16, "inner_size": 32, "n_layers": 1}
    model = build_backbone("SASRec", n_items, 8, **kwargs).eval()
    folder = cfg.model_dir(fold_model_name("SASRec", fold, cfg.data.folds))
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "meta.json").write_text(json.dumps({"backbone": "SASRec", "fusion": "none", "model": kwargs, "n_items": n_items,
                                                  "max_len": 8, "holdout_fold": holdout_fold, "folds": cfg.data.folds}))
    return model


def test_candidates_come_from_the_fold_model_that_never_saw_the_user(ring_dataset, tmp_path, shared_ray):
    cfg = load_config(None, [f"data.interactions={ring_dataset / 'r.inter'}", f"data.items={ring_dataset / 'r.item'}",
                             f"run.output_dir={tmp_path}", "teacher.candidates=backbone", "teacher.n_candidates=6",
                             "teacher.backbone_candidates=3", "teacher.num_samples=12", "data.checkpoints_per_user=2",
                             "data.checkpoint_stride=2"])
    run_prepare(cfg.data, cfg.prepared_dir)
    items, sequences, stats = load_prepared(cfg.prepared_dir)
    rows = teach_checkpoints(sequences, 12, 0, 2, 2)
    assert rows["user_id"].is_unique and len(rows) == 12
    assert rows["user_id"].tolist()[:6] == teach_checkpoints(sequences, 6, 0, 2, 2)["user_id"].tolist()  # resumable
    with pytest.raises(DataError, match="train-folds"):
        checkpoint_candidates(rows, sequences, len(items) + 1, cfg)  # nothing trained yet: no silent fallback

    models = {fold: _save_fold_model(cfg, fold, fold, len(items) + 1) for fold in (0, 1)}
    candidates, unseen_fold = checkpoint_candidates(rows, sequences, len(items) + 1, cfg)
    assert (unseen_fold == rows["user_id"].to_numpy() % 2).all()  # read from each model's meta.json
    for row, cands in zip(rows.itertuples(), candidates):
        top = top_unseen(models[row.user_id % 2], [row.history_ids], 8, 3)[0]
        assert cands[:3] == top and len(cands) == 6 and not set(cands) & set(row.history_ids)  # ranked
    requests = build_requests(items, rows, candidates, cfg.teacher, stats["domain"])
    titles = items.set_index("item_id")["title"]
    for row in requests.itertuples():  # teacher and student see the same candidates
        for item in row.candidate_ids:
            assert titles[item] in row.teacher_messages and titles[item] in row.student_messages

    _save_fold_model(cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": tmp_path / "bad"})}), 0, 1,
                     len(items) + 1)
    bad = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": tmp_path / "bad"})})
    with pytest.raises(DataError, match="not trained without fold 0"):
        checkpoint_candidates(rows, sequences, len(items) + 1, bad)


def test_a_loopback_teacher_is_refused_on_a_cluster_of_several_machines():
    """Teacher actors on another machine would call their own loopback: refused before any request; a
    multi-node cluster on one machine (the local 2-node test) and a routable URL are fine."""
    from slim_ray.errors import ConfigError
    from slim_ray.teach import check_reachable, is_loopback

    assert is_loopback("http://127.0.0.1:8011/v1") and is_loopback("http://localhost:8011/v1")
    assert is_loopback("http://[::1]:8011/v1") and not is_loopback("http://10.0.0.5:8011/v1")
    assert not is_loopback("https://api.openai.com/v1")
    with pytest.raises(ConfigError, match="loopback address.*2 machines"):
        check_reachable("http://127.0.0.1:8011/v1", {"10.0.0.4", "10.0.0.5"})
    with pytest.raises(ConfigError, match="no CPUs"):  # a head with num-cpus 0: actors land on workers
        check_reachable("http://127.0.0.1:8011/v1", {"10.0.0.4"}, local_cpus=0)
    check_reachable("http://127.0.0.1:8011/v1", {"10.0.0.4"})
    check_reachable("http://10.0.0.4:8011/v1", {"10.0.0.4", "10.0.0.5"})


FAULT_SERVER_COMMAND = [sys.executable, "-m", "slim_ray.fault_server", "--host", "{host}", "--port", "{port}",
                        "--no-faults"]


@pytest.mark.slow
def test_launch_local_runs_the_configured_server_for_the_stage_only(ring_dataset, shared_ray):
    """launch_local with a silent loopback base_url starts teacher.server_command (here the fault server
    standing in for llama.cpp or vLLM) for the stage, answers every row through it, and stops it."""
    from slim_ray.serve_app import free_port
    from slim_ray.teacher_server import is_up

    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = load_config(None, [f"data.interactions={ring_dataset / 'r.inter'}", f"data.items={ring_dataset / 'r.item'}",
                             f"run.output_dir={ring_dataset / 'launched'}", "ray.object_store_memory_mb=100",
                             f"teacher.base_url={url}", "teacher.model=fault-model", "teacher.num_samples=8",
                             "teacher.n_candidates=5", "teacher.launch_local=true",
                             f"teacher.server_command={json.dumps(FAULT_SERVER_COMMAND)}"])
    run_prepare(cfg.data, cfg.prepared_dir)
    assert not is_up(url)
    ledger = run_teach(cfg)
    assert ledger["rationales"] == 8 and ledger["failures"] == 0
    assert not is_up(url)  # gone with the stage
    assert (ring_dataset / "launched" / "teacher_server.log").is_file()


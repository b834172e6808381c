"""Recommend-and-explain: the versioned serving bundle, the request flow, and a real Serve app on loopback."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest

from slim_ray.config import load_config
from slim_ray.prepare import run_prepare
from slim_ray.errors import RequestError
from slim_ray.serve import Bundle, BundleWatcher, StudentCore, publish_bundle, recommend
from conftest import slim_run_overrides  # tests/ is on sys.path (pytest rootdir)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_run(ring_dataset, tiny_student, shared_ray):
    """A SLIM-fused tiny SASRec trained on a real backfill (HF student), published as a serving bundle."""
    from slim_ray.backfill import run_backfill
    from slim_ray.train import run_train

    cfg = load_config(None, slim_run_overrides(ring_dataset, tiny_student[0], "serve", epochs=1))
    run_prepare(cfg.data, cfg.prepared_dir)
    run_backfill(cfg.model_copy(update={"backfill": cfg.backfill.model_copy(update={"max_users": 30})}))
    run_train(cfg)
    publish_bundle(cfg)
    return cfg


def test_fused_model_trained_on_ray_uses_the_rationales(served_run):
    import torch

    from slim_ray.evaluation import split_arrays
    from slim_ray.storage import load_prepared
    from slim_ray.artifacts import fusion_vectors
    from slim_ray.fusion import load_trained
    from slim_ray.train import run_evaluate

    model, meta = load_trained(served_run.model_dir())
    assert meta["name"] == "SASRec-slim" and meta["fusion"] == "slim" and len(meta["history"]) == 1
    report = run_evaluate(served_run)
    assert report["model"] == "SASRec-slim" and 0 <= report["full"]["ndcg@10"] <= 1
    _, sequences, _ = load_prepared(served_run.prepared_dir)
    _, user_text, _ = fusion_vectors(served_run, meta["n_items"], sequences)
    arrays = split_arrays(sequences, "test", meta["max_len"], user_text["test"])
    with torch.no_grad():
        scores = model.full_sort_predict(arrays)
        blank = model.full_sort_predict({**arrays, "user_text": torch.zeros_like(arrays["user_text"])})
    assert not torch.allclose(scores, blank)  # the rationale vector moves the scores


def test_all_positions_slim_run_gives_each_target_its_checkpoints_rationale(served_run, tmp_path):
    """The window objective on the same backfill: the leak guard audits every target position, and
    the same targets get a rationale as under the prefix objective."""
    import shutil

    from slim_ray.fusion import load_trained
    from slim_ray.train import run_train

    root = tmp_path / "run"
    for part in ("prepared", "backfill"):
        shutil.copytree(served_run.run.output_dir / part, root / part)
    _, prefix_meta = load_trained(served_run.model_dir())
    cfg = served_run.model_copy(update={"run": served_run.run.model_copy(update={"output_dir": root}),
                                        "train": served_run.train.model_copy(update={"objective": "all_positions"})})
    meta = run_train(cfg)
    guard, prefix_guard = meta["leak_guard"], prefix_meta["leak_guard"]
    assert meta["objective"] == "all_positions" and guard["violations"] == 0
    assert guard["training_rows"] == prefix_guard["training_rows"]  # targets, each once
    assert guard["rows_with_rationale"] == prefix_guard["rows_with_rationale"] > 0
    assert meta["history"][0]["steps"] < prefix_meta["history"][0]["steps"]


def test_dllm2rec_on_slim_trains_on_ray_from_the_named_items(served_run, tmp_path):
    """slim+dllm2rec through Ray Train on a copy of the backfill whose step 3 names real titles."""
    import shutil

    import pandas as pd

    from slim_ray.dllm2rec import DLLM2Rec, distill_targets
    from slim_ray.storage import load_prepared
    from slim_ray.fusion import load_trained
    from slim_ray.train import run_evaluate, run_train

    root = tmp_path / "run"
    for part in ("prepared", "backfill"):
        shutil.copytree(served_run.run.output_dir / part, root / part)
    items, sequences, _ = load_prepared(root / "prepared")
    title, following = items.set_index("item_id")["title"], sequences.set_index("user_id")["valid_target"]
    path = root / "backfill" / "rationales.parquet"
    rows = pd.read_parquet(path)
    rows["rationale"] = [f"Step 1: walks the ring.\nStep 2: Comedy\nStep 3: {title[following[u]]}, Nothing Real"
                         for u in rows["user_id"]]
    rows.to_parquet(path)
    ids, _ = distill_targets(rows, items, top_k=5)  # one line per checkpoint row, after row 0 (none)
    fresh = (rows["split"] != "test").to_numpy()  # the test checkpoint's history holds the valid target
    assert (ids[1:][fresh, 0] == following[rows.loc[fresh, "user_id"]].to_numpy()).all() and (ids[1:][~fresh] == 0).all()
    cfg = served_run.model_copy(update={"run": served_run.run.model_copy(update={"output_dir": root}),
                                        "train": served_run.train.model_copy(update={"fusion": "slim+dllm2rec"})})
    meta = run_train(cfg)
    assert meta["name"] == "SASRec-slim+dllm2rec" and meta["dllm2rec"]["ranking_weight"] == 0.5
    model, _ = load_trained(cfg.model_dir())
    assert isinstance(model, DLLM2Rec) and model.inner.use_rationale
    # one training row per backfilled user (ring histories of 6: the checkpoint at n-3 serves t = 3)
    assert meta["leak_guard"]["violations"] == 0 and meta["leak_guard"]["rows_with_rationale"] == rows["user_id"].nunique()
    assert run_evaluate(cfg)["users"] == len(sequences)


def _sync(fn):
    async def call(*args):
        return fn(*args)
    return call


async def _vector(bundle, item_ids, text):
    return bundle.user_vectors([item_ids], [text])[0]


def test_bundle_search_exact_and_ann_agree_and_exclude_seen(served_run):
    """The same published vectors searched exactly in memory and by LanceDB ANN (catalogue over
    serve.exact_max_items): same top-10, seen items never returned, scores descending."""
    ann_cfg = served_run.model_copy(update={"serve": served_run.serve.model_copy(update={"exact_max_items": 0})})
    assert publish_bundle(ann_cfg)["search"] == "ann"
    ann = Bundle(served_run.serving_dir.resolve(), 5, 10)
    exact_manifest = publish_bundle(served_run)
    exact = Bundle(served_run.serving_dir.resolve(), 5, 10)
    assert exact_manifest["search"] == "exact" and exact.version == ann.version + 1 and exact.folder != ann.folder
    rng = np.random.default_rng(0)
    agree = []
    for _ in range(20):
        query = rng.standard_normal(exact.manifest["dim"]).astype(np.float32)
        by_ann, by_exact = ([h["item_id"] for h in b.search(query, 10, [])] for b in (ann, exact))
        agree.append(len(set(by_ann) & set(by_exact)) / 10)
    assert np.mean(agree) >= 0.95
    ranked = [h["item_id"] for h in exact.search(query, 13, [])]
    for bundle in (ann, exact):  # the three best items seen: the next ten come back, in order
        hits = bundle.search(query, 10, ranked[:3])
        assert [h["item_id"] for h in hits] == ranked[3:13]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    everything = list(exact.items.index)
    assert exact.search(query, 5, everything[2:]) == exact.search(query, 10, everything[2:])  # only 2 left


def test_request_flow_cached_fresh_and_errors(served_run):
    from slim_ray.serve_app import RecommendResponse

    bundle = BundleWatcher(served_run).current()
    student = StudentCore(served_run)
    calls = []

    def explain(history, candidates):
        calls.append(history)
        return student.explain(history, candidates)

    run = lambda **kw: asyncio.run(recommend(bundle, _sync(explain), _vector, **{  # noqa: E731
        "user_id": None, "history": None, "k": 5, "exclude_seen": True, "explain": True, **kw}))
    known = run(user_id="u1")  # in the backfill (first 30 users)
    assert known["rationale_source"] == "cached" and not calls and len(known["items"]) == 5
    assert known["timings_ms"].keys() == {"resolve", "user_vector", "search"}  # no hop, no forward pass
    seen = set(bundle.resolve("u1", None)[0])
    assert not seen & {i["item_id"] for i in known["items"]}
    fresh = run(history=["3", "4", "5"])
    assert fresh["rationale_source"] == "fresh" and len(calls) == 1 and fresh["explanation"]["rationale"] is not None
    assert fresh["versions"]["student"] == student.version
    assert fresh["versions"]["bundle"] == known["versions"]["bundle"] == bundle.version
    for response in (known, fresh):  # one schema, cached or fresh
        RecommendResponse.model_validate(response)
    grounded = fresh["explanation"]["candidates"]  # the served model's top unseen items, as at backfill time
    assert len(grounded) == served_run.teacher.n_candidates and not set(grounded) & set(bundle.resolve(None, ["3", "4", "5"])[0])
    assert "student" in fresh["timings_ms"] and "student" not in known["timings_ms"]
    for kwargs, status in (({"user_id": "nobody"}, 404), ({"history": ["999"]}, 422), ({"history": []}, 422)):
        with pytest.raises(RequestError) as error:
            run(**kwargs)
        assert error.value.status == status


def read_events(client, body: dict) -> list[tuple[str, dict, float]]:
    """(event, data, arrival time) of a server-sent event stream from /v1/recommend/stream."""
    import json

    events, name = [], None
    with client.stream("POST", "/v1/recommend/stream", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):]), time.perf_counter()))
    return events


def check_contract(url: str, examples: int = 60) -> int:
    """Schemathesis: requests generated from the served OpenAPI document, valid and invalid, for each
    operation; every response must have a documented status, content type and schema, no 5xx, and
    invalid requests must be refused. A valid request may still name ids the catalogue does not
    have (404, or 422 for unknown item ids: documented). Returns the number of requests sent."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent = []
    for path, method in (("/v1/recommend", "POST"), ("/v1/items/{item_id}", "GET")):
        operation = schema[path][method]

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE))
        def conforms(case):
            response = case.call_and_validate(base_url=url, excluded_checks=[positive_data_acceptance])
            sent.append(response.status_code)
            if response.status_code == 422 and case.meta.generation.mode == GenerationMode.POSITIVE:
                assert response.json()["error"].startswith("unknown item ids"), (case.body, response.text)

        conforms()
    return len(sent)


def test_serve_app_endpoints_bad_requests_and_contract(served_run):
    import httpx

    from slim_ray.serve_app import MAX_BODY_BYTES, Explanation, free_port, metrics_url, serving

    with serving(served_run, port=free_port()) as url:
        client = httpx.Client(base_url=url, timeout=60)
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/docs").status_code == 200 and "/v1/recommend" in client.get("/openapi.json").text
        known = client.post("/v1/recommend", json={"user_id": "u1", "k": 3})
        assert known.status_code == 200 and known.json()["rationale_source"] == "cached"
        assert len(known.json()["items"]) == 3
        fresh = client.post("/v1/recommend", json={"history": ["3", 4, "5"], "k": 3})
        assert fresh.status_code == 200 and fresh.json()["rationale_source"] == "fresh"
        assert fresh.json()["explanation"].keys() == known.json()["explanation"].keys()
        assert client.get("/v1/items/3").json()["title"] == "Film3"
        bad = {
            "unknown user": ({"user_id": "nobody"}, 404),
            "empty history": ({"history": []}, 422),
            "unknown item": ({"history": ["999"]}, 422),
            "k too large": ({"user_id": "u1", "k": 1000}, 422),
            "k zero": ({"user_id": "u1", "k": 0}, 422),
            "wrong type": ({"user_id": "u1", "k": "ten"}, 422),
            "both sources": ({"user_id": "u1", "history": ["3"]}, 422),
            "neither source": ({}, 422),
            "null user": ({"user_id": None}, 422),
            "extra field": ({"user_id": "u1", "limit": 3}, 422),
        }
        for name, (body, status) in bad.items():
            response = client.post("/v1/recommend", json=body)
            assert response.status_code == status, name
            assert response.json()["error"], name
        assert client.get("/v1/items/999").status_code == 404
        big = client.post("/v1/recommend", content=b"{" + b" " * MAX_BODY_BYTES + b"}",
                          headers={"content-type": "application/json"})
        assert big.status_code == 413
        assert client.post("/v1/recommend", content=b"not json", headers={"content-type": "application/json"}
                           ).status_code == 422
        streamed = read_events(client, {"history": ["3", 4, "5"], "k": 3})
        names = [name for name, _, _ in streamed]
        assert names[0] == "items" and names[-1] == "explanation" and names.count("token") >= 2, names
        assert streamed[-1][2] - streamed[0][2] > 0.01  # items arrived while the student was still writing
        explanation = Explanation.model_validate(streamed[-1][1])
        assert "".join(data["token"] for name, data, _ in streamed if name == "token").strip() == explanation.rationale
        assert [name for name, _, _ in read_events(client, {"user_id": "u1", "k": 3})] == ["items", "explanation"]
        assert client.post("/v1/recommend/stream", json={"user_id": "nobody"}).status_code == 404
        for path in ("/v1/nothing", "/v1/items/abc"):  # unknown route, wrong type: the same error shape
            assert set(client.get(path).json()) == {"error"}
        assert check_contract(url) >= 100
        assert client.get("/healthz").status_code == 200  # still serving after every bad request
        # request metrics are Serve's own, on the node's Ray metrics port (exported every few seconds)
        wanted = ('ray_serve_num_http_requests_total{', 'route="/v1/recommend"', 'status_code="200"')
        error = ('ray_serve_num_http_error_requests_total{', 'route="/v1/recommend"', 'error_code="413"')

        def exported() -> bool:
            lines = httpx.get(metrics_url()).text.splitlines()
            ok = sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(part in line for part in wanted))
            return ok >= 2 and any(all(part in line for part in error) for line in lines)

        deadline = time.monotonic() + 60
        while not exported() and time.monotonic() < deadline:
            time.sleep(2)
        assert exported()


def test_retrained_model_swaps_in_under_load_without_failures_or_mixed_versions(served_run, tmp_path):
    """Retrain (other seed: other weights), publish while requests are in flight: no request fails, the
    new bundle is served within seconds, and every response's items are exactly what the bundle
    version it names gives (never the new model's user vector against the old item vectors)."""
    import httpx

    from slim_ray.serve_app import free_port, serving
    from slim_ray.train import run_train

    root = tmp_path / "run"
    for part in ("prepared", "backfill", "models", "lancedb"):
        shutil.copytree(served_run.run.output_dir / part, root / part)
    cfg = served_run.model_copy(update={"run": served_run.run.model_copy(update={"output_dir": root})})
    first = publish_bundle(cfg)["version"]
    request = {"user_id": "u2", "k": 5, "explain": False}
    responses, failures, done = [], [], threading.Event()
    with serving(cfg, port=free_port(), student=False) as url:
        client = httpx.Client(base_url=url, timeout=60)
        # without a Student deployment a fresh rationale is refused before any event is sent
        refused = client.post("/v1/recommend/stream", json={"history": ["3", "4"], "k": 3})
        assert refused.status_code == 503 and set(refused.json()) == {"error"}
        assert [n for n, _, _ in read_events(client, {"history": ["3", "4"], "k": 3, "explain": False})] == ["items"]

        def hammer():
            while not done.is_set():
                r = client.post("/v1/recommend", json=request)
                (responses.append(r.json()) if r.status_code == 200 else failures.append(r.status_code))

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            retrained = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": cfg.run.seed + 1})})
            run_train(retrained)
            second = publish_bundle(retrained)["version"]
            deadline = time.time() + 20  # replicas look for a new version every serve.refresh_s
            while not any(r["versions"]["bundle"] == second for r in responses[-5:]) and time.time() < deadline:
                time.sleep(0.2)
        finally:
            done.set()
            worker.join()
    assert not failures and second == first + 1
    served = {r["versions"]["bundle"] for r in responses}
    assert served == {first, second}
    expected = {}
    for folder in root.glob("serving/.*.v-*"):  # the current and the previous version are both kept
        bundle = Bundle(folder, 5, 10)
        row = bundle.user_row["u2"]
        expected[bundle.version] = [h["item_id"] for h in bundle.search(bundle.user_matrix[row], 5, bundle.seen[row])]
    assert expected.keys() == {first, second} and expected[first] != expected[second]  # the weights differ
    mixed = [r for r in responses if [i["item_id"] for i in r["items"]] != expected[r["versions"]["bundle"]]]
    assert not mixed


def test_serve_demo_runs_in_its_own_lane_beside_another_application(served_run):
    """The pipeline's serve-demo stage on a cluster that already serves an app: it deploys under its own
    name and route on the running proxy, then removes only itself; Serve and the other app keep running."""
    import httpx
    from ray import serve

    from slim_ray.ray_session import ray_session
    from slim_ray.errors import ConfigError
    from slim_ray.serve_app import DEMO_APP, demo_requests, free_port, serving

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Production:
        def __call__(self, request) -> str:
            return "production"

    port = free_port()
    with ray_session(served_run.ray):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(Production.bind(), name="slim", route_prefix="/")  # the name the demo used to take
            with pytest.raises(ConfigError, match="already runs"):  # never replaces an app it did not deploy
                with serving(served_run, name="slim"):
                    pass
            demo = demo_requests(served_run)
            assert demo["known user"]["status"] == 200 and demo["bad request (k out of range)"]["status"] == 422
            assert set(serve.status().applications) == {"slim"} and DEMO_APP != "slim"
            assert httpx.get(f"http://127.0.0.1:{port}/").text == "production"
        finally:
            serve.shutdown()

"""The Ray Serve application: FastAPI ingress -> Recommender -> ItemIndex (LanceDB) [-> Student].

  POST /v1/recommend   {user_id} or {history: [raw item ids]}, k, exclude_seen, explain
  GET  /v1/items/{id}  item metadata;   GET /healthz;   GET /metrics (Prometheus text format)
Bad requests get a 4xx JSON body {"error": reason}; the service keeps serving.
`build_app(args)` is the import path of serve_configs/recommend.yaml (`serve run` / `serve deploy`).
No `from __future__ import annotations` here: Serve's ingress rebuilds the route signatures and
needs the request models as real classes, not strings.
"""


import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from slim_ray.config import Config, load_config
from slim_ray.errors import ConfigError
from slim_ray.serve import IndexCore, RecommenderCore, RequestError, StudentCore, recommend

MAX_BODY_BYTES = 64 * 1024
DEMO_APP = "slim-demo"  # the pipeline's demo: never the name or route of a production app
MAX_HISTORY = 1000


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Optional[Union[str, int]] = Field(None, description="Raw user id of a known user.")
    history: Optional[list[Union[str, int]]] = Field(None, max_length=MAX_HISTORY,
                                                     description="Raw item ids, oldest first.")
    k: int = Field(10, ge=1, le=100, description="Items to return.")
    exclude_seen: bool = Field(True, description="Never return items of the history.")
    explain: bool = Field(True, description="Return the rationale (cached from the backfill, or fresh).")

    @model_validator(mode="after")
    def one_source(self) -> "RecommendRequest":
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class Item(BaseModel):
    item_id: int
    raw_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    items: list[Item]
    explanation: Optional[dict]
    rationale_source: Optional[str] = Field(description="cached | fresh | null")
    versions: dict
    latency_ms: float = Field(description="Time inside the ingress replica.")
    timings_ms: dict[str, float] = Field(description="Per hop: resolve, student (fresh rationales only), "
                                         "user_vector, search (the index call), index (LanceDB in it).")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class ItemIndex:
    def __init__(self, uri: str):
        self.core = IndexCore(uri)

    def search(self, vector, k: int, exclude: list[int]) -> dict:
        return self.core.search(vector, k, exclude)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=4,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2})
class Student:
    def __init__(self, config: dict, engine: str):
        self.core = StudentCore(Config(**config), engine)

    def explain(self, history: list[dict], candidates: list[dict]) -> dict:
        return self.core.explain(history, candidates)


api = FastAPI(title="slim-ray recommend-and-explain", version="1",
              description="Items for a user, and why: SLIM rationales from a distilled student.")
# One registry per process = per replica; Prometheus sums replicas when it scrapes them.
REGISTRY = CollectorRegistry()
REQUESTS = Counter("slim_requests", "Requests by route and status", ["route", "status"], registry=REGISTRY)
LATENCY = Histogram("slim_request_seconds", "Request latency", ["route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30))


def render_metrics() -> str:
    # Module-level on purpose: Serve pickles the ingress class by value, and a REGISTRY referenced
    # from its methods would be a stale copy; functions of this module resolve to the replica's own.
    return generate_latest(REGISTRY).decode()


@api.middleware("http")
async def limit_and_count(request: Request, call_next):
    start = time.perf_counter()
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        response = JSONResponse({"error": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
    else:
        response = await call_next(request)
    route = "/v1/items/{id}" if request.url.path.startswith("/v1/items/") else request.url.path
    REQUESTS.labels(route, str(response.status_code)).inc()
    LATENCY.labels(route).observe(time.perf_counter() - start)
    return response


@api.exception_handler(RequestValidationError)
async def invalid(_: Request, exc: RequestValidationError):
    reasons = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()]
    return JSONResponse({"error": "; ".join(reasons)}, status_code=422)


@api.exception_handler(RequestError)
async def bad_request(_: Request, exc: RequestError):
    return JSONResponse({"error": exc.reason}, status_code=exc.status)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
@serve.ingress(api)
class RecommendAPI:
    def __init__(self, config: dict, index, student):
        self.core = RecommenderCore(Config(**config))
        self.index, self.student = index, student

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> dict:
        async def explain(history, candidates):
            if self.student is None:
                raise RequestError(503, "no student deployment: explanations for new histories are off")
            return await self.student.explain.remote(history, candidates)

        async def search(vector, k, exclude):
            return await self.index.search.remote(vector, k, exclude)

        history = [str(h) for h in body.history] if body.history is not None else None
        user_id = str(body.user_id) if body.user_id is not None else None
        return await recommend(self.core, explain, search, user_id, history, body.k, body.exclude_seen,
                               body.explain)

    @api.get("/v1/items/{item_id}")
    async def item(self, item_id: int) -> dict:
        return self.core.item(item_id)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.core.meta.get("name", self.core.meta["backbone"])}

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self) -> str:
        return render_metrics()


def application(cfg: Config, student: bool = True, engine: str = "hf"):
    """The bound application: ingress -> recommender core, ItemIndex and (optionally) Student."""
    # replicas may start in another working directory: pin the run folder
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": cfg.run.output_dir.resolve()})})
    config = cfg.model_dump(mode="json")
    uri = str(Path(cfg.backfill.lancedb_uri or cfg.run.output_dir / "lancedb").resolve())
    return RecommendAPI.bind(config, ItemIndex.bind(uri), Student.bind(config, engine) if student else None)


def build_app(args: dict):
    """Import path of serve_configs/recommend.yaml: args = {config, overrides, student, engine}."""
    cfg = load_config(args.get("config"), list(args.get("overrides", [])))
    return application(cfg, str(args.get("student", True)).lower() not in ("false", "0"), args.get("engine", "hf"))


@contextmanager
def serving(cfg: Config, port: int = 8000, student: bool = True, engine: str = "hf", name: str = "slim",
            route_prefix: str = "/") -> Iterator[str]:
    """The app deployed as `name` at `route_prefix`; yields its base URL. Starts Ray and Serve (HTTP on
    127.0.0.1:port) only where none runs, else deploys beside the running applications on their proxy.
    Afterwards it deletes its own application and shuts down only what it started, when nothing else runs."""
    from slim_ray.ray_session import ray_session

    with ray_session(cfg.ray):
        running_port = serve_http_port()
        if running_port is None:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        elif name in serve.status().applications:  # never replace (and then delete) an app we did not deploy
            raise ConfigError(f"a Serve application named {name!r} already runs on this cluster: "
                              "serve this run under another name")
        try:
            serve.run(application(cfg, student, engine), name=name, route_prefix=route_prefix)
            yield f"http://127.0.0.1:{running_port or port}{route_prefix.rstrip('/')}"
        finally:
            serve.delete(name)
            if running_port is None and not serve.status().applications:
                serve.shutdown()


def serve_http_port() -> Optional[int]:
    """HTTP port of the Serve instance running on this Ray cluster, or None when there is none."""
    from ray.serve.context import _get_global_client  # the public API does not expose the proxy's port

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else int(client.get_serve_details()["http_options"]["port"])


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def demo_requests(cfg: Config, port: int | None = None) -> dict:
    """The demo's last stage: serve locally, send real requests, return what came back, shut down."""
    import httpx

    port = port or free_port()  # 8000 may be taken on a shared machine

    from slim_ray.storage import load_prepared

    items, sequences, _ = load_prepared(cfg.prepared_dir)
    raw_id = dict(zip(items["item_id"], items["raw_id"].astype(str)))
    user = str(sequences["raw_user_id"].iloc[0])
    history = [raw_id[int(i)] for i in sequences["item_ids"].iloc[1][:5]]  # another user's first items
    requests = {"known user": {"user_id": user, "k": 5},
                "raw history": {"history": history, "k": 5},
                "bad request (k out of range)": {"user_id": user, "k": 0}}
    with serving(cfg, port=port, name=DEMO_APP, route_prefix=f"/{DEMO_APP}") as url:  # its own lane
        with httpx.Client(base_url=url, timeout=120) as client:
            return {name: {"request": body, "status": (r := client.post("/v1/recommend", json=body)).status_code,
                           "response": r.json()} for name, body in requests.items()}

"""The Ray Serve application: one FastAPI ingress that holds the serving bundle [-> Student].

  POST /v1/recommend   {user_id} or {history: [raw item ids]}, k, exclude_seen, explain
  POST /v1/recommend/stream  the same as server-sent events: items at once, the rationale as it is written
  GET  /v1/items/{id}  item metadata;   GET /healthz
Request counts and latencies by route and status are Ray Serve's own metrics (ray_serve_num_http_requests,
ray_serve_http_request_latency_ms, ...), scraped from each node's Ray metrics port (`metrics_url`).
Bad requests get a 4xx JSON body {"error": reason}; the service keeps serving.
The ingress answers from the published bundle it holds (model, item vectors from LanceDB, known users'
vectors: no hop on the hot path); only fresh rationales call the separate, batched Student deployment.
`build_app(args)` is the import path of serve_configs/recommend.yaml (`serve run` / `serve deploy`).
No `from __future__ import annotations` here: Serve's ingress rebuilds the route signatures and
needs the request models as real classes, not strings.
"""


import asyncio
import json
from contextlib import contextmanager
from typing import Annotated, Iterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from ray import serve

from slim_ray.config import Config, load_config
from slim_ray.errors import ConfigError, RequestError
from slim_ray.serve import BundleWatcher, StudentCore, recommend, recommend_stream

MAX_BODY_BYTES = 64 * 1024
DEMO_APP = "slim-demo"  # the pipeline's demo: never the name or route of a production app
MAX_HISTORY = 1000


def whole_number(value):
    """JSON Schema counts 3.0 as an integer, so the API takes it as 3 (strict parsing refuses all else)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeInt = Annotated[int, BeforeValidator(whole_number)]


class RecommendRequest(BaseModel):
    # The published schema states the one-of rule; the validator enforces it.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["user_id"]}, {"required": ["history"]}],
        "examples": [{"user_id": "196", "k": 10}, {"history": ["242", "302"], "k": 5, "explain": True}]})
    user_id: Union[str, WholeInt] = Field(None, description="Raw user id of a known user (give this or history).")
    history: list[Union[str, WholeInt]] = Field(None, min_length=1, max_length=MAX_HISTORY,
                                           description="Raw item ids, oldest first (give this or user_id).")
    k: WholeInt = Field(10, ge=1, le=100, description="Items to return.")
    exclude_seen: bool = Field(True, description="Never return items of the history.")
    explain: bool = Field(True, description="Return the rationale (cached from the backfill, or fresh).")

    @model_validator(mode="after")
    def one_source(self) -> "RecommendRequest":
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self

    def source(self) -> tuple[Optional[str], Optional[list[str]]]:
        """(user_id, history) as the raw-id strings the bundle resolves."""
        return (None if self.user_id is None else str(self.user_id),
                None if self.history is None else [str(h) for h in self.history])


class ErrorBody(BaseModel):
    """Every error the API returns has this shape."""
    error: str = Field(description="Why the request was refused.")


def errors(*statuses: int) -> dict:
    reasons = {400: "The body could not be read (not decodable as JSON text).", 404: "Unknown user or item id.", 413: f"Request body over {MAX_BODY_BYTES} bytes.",
               422: "Invalid request: malformed JSON, a field out of range, unknown item ids in the history.",
               503: "Explanations for new histories are off (no Student deployment)."}
    return {status: {"model": ErrorBody, "description": reasons[status]} for status in statuses}


class Item(BaseModel):
    item_id: int
    raw_id: str
    title: str
    score: float


class ItemDetail(BaseModel):
    item_id: int
    raw_id: str
    title: str
    categories: list[str]
    brand: Optional[str]
    year: Optional[str]


class Explanation(BaseModel):
    """One shape for a cached (backfilled) and a fresh rationale."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    rationale: str
    steps: list[str] = Field(min_length=3, max_length=3, description="Preferences, genres, items (\"\" if missing).")
    model_version: str = Field(description="Content hash of the student that wrote it.")
    candidates: list[int] = Field(description="Item ids the student chose step 3 from.")


class RecommendResponse(BaseModel):
    items: list[Item]
    explanation: Optional[Explanation]
    rationale_source: Optional[str] = Field(description="cached | fresh | null")
    versions: dict = Field(description="bundle (the published version every part of the answer comes from), "
                           "model, student (the rationale's writer, when there is one).")
    latency_ms: float = Field(description="Time inside the ingress replica.")
    timings_ms: dict[str, float] = Field(description="Per step: resolve, student (fresh rationales only), "
                                         "user_vector, search.")


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8})
class Student:
    def __init__(self, config: dict, engine: str):
        cfg = Config(**config)
        self.core = StudentCore(cfg, engine)
        self.explain.set_max_batch_size(cfg.serve.student_batch)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def explain(self, histories: list, candidates: list) -> list:
        # one generate call for the requests that arrived together; off the replica's event loop
        return await asyncio.to_thread(self.core.explain_batch, list(zip(histories, candidates)))

    async def stream(self, history: list, candidates: list):
        """Called with stream=True: the rationale's pieces as they are written, then the explanation."""
        parts = self.core.stream(history, candidates)
        try:
            while (part := await asyncio.to_thread(next, parts, None)) is not None:
                yield part
        finally:  # a client that went away stops the generation
            await asyncio.to_thread(parts.close)


api = FastAPI(title="slim-ray recommend-and-explain", version="1",
              description="Items for a user, and why: SLIM rationales from a distilled student.")


@api.middleware("http")
async def limit_body(request: Request, call_next):
    """Refuse an oversized body before it is read (Serve counts the 413 like any other status)."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        return JSONResponse({"error": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
    return await call_next(request)


@api.exception_handler(StarletteHTTPException)
async def http_error(_: Request, exc: StarletteHTTPException):  # unknown paths, wrong methods: same shape
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


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
    def __init__(self, config: dict, student):
        cfg = Config(**config)
        self.bundles, self.student = BundleWatcher(cfg), student
        self.vectors.set_max_batch_size(cfg.serve.vector_batch)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def vectors(self, bundles: list, histories: list, texts: list) -> list:
        """Raw histories' user vectors, one forward pass per bundle among the requests batched together."""
        out = [None] * len(bundles)
        for bundle in {id(b): b for b in bundles}.values():
            rows = [i for i, b in enumerate(bundles) if b is bundle]
            found = await asyncio.to_thread(bundle.user_vectors, [histories[i] for i in rows], [texts[i] for i in rows])
            for i, vector in zip(rows, found):
                out[i] = vector
        return out

    @api.post("/v1/recommend", response_model=RecommendResponse, responses=errors(400, 404, 413, 422, 503))
    async def recommend(self, body: RecommendRequest) -> dict:
        async def explain(history, candidates):
            if self.student is None:
                raise RequestError(503, "no student deployment: explanations for new histories are off")
            return await self.student.explain.remote(history, candidates)

        return await recommend(self.bundles.current(), explain, self.vectors, *body.source(), body.k,
                               body.exclude_seen, body.explain)

    @api.post("/v1/recommend/stream", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events: `items` (the items, at once), "
              "`token` ({text} pieces of a fresh rationale as the student writes it), `explanation` (the Explanation)."},
        **errors(400, 404, 413, 422, 503)})
    async def recommend_stream(self, body: RecommendRequest):
        async def stream(history, candidates):
            async for part in self.student.options(stream=True).stream.remote(history, candidates):
                yield part

        events = await recommend_stream(self.bundles.current(), stream if self.student is not None else None,
                                        self.vectors, *body.source(), body.k, body.exclude_seen, body.explain)
        return StreamingResponse((f"event: {name}\ndata: {json.dumps(data)}\n\n" async for name, data in events),
                                 media_type="text/event-stream")

    @api.get("/v1/items/{item_id}", response_model=ItemDetail, responses=errors(404, 422))
    async def item(self, item_id: int) -> dict:
        return self.bundles.current().item(item_id)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        bundle = self.bundles.current()
        return {"status": "ok", "model": bundle.manifest["model"], "bundle": bundle.version}


def application(cfg: Config, student: bool = True, engine: str = "hf"):
    """The bound application: the ingress (serving bundle) and, optionally, the Student deployment."""
    # replicas may start in another working directory: pin the run folder
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": cfg.run.output_dir.resolve()})})
    config = cfg.model_dump(mode="json")
    return RecommendAPI.bind(config, Student.bind(config, engine) if student else None)


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


def metrics_url() -> str:
    """Prometheus endpoint of this node's Ray metrics agent, where Serve's request metrics are exported."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"] and n["NodeID"] == ray.get_runtime_context().get_node_id())
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


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

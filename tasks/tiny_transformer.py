"""Tiny causal transformers on synthetic sequence tasks (family ``tiny_transformer``).

Attention, layer norm and embeddings are the parameter types that hand-designed optimizers are tuned
for today and that MLP-only meta-training never shows a learned optimizer. The model is written
functionally from the parameter dict (pre-LN blocks: causal multi-head self-attention, then an MLP;
final LN; linear head) with a hand-written attention so ``torch.func.grad`` -- including the
grad-of-grad that truncated backprop through an unroll needs -- and ``vmap`` apply.

Sequence tasks (``seq_task``), each fully determined by the config:

* ``copy`` / ``reverse`` / ``sort``: ``length`` random tokens from ``vocab``, a separator, then the
  answer; the loss is the cross-entropy on the answer positions only (teacher forcing).
* ``markov``: next-token prediction on a random Markov chain over ``vocab`` states; the transition
  matrix ``softmax(sharpness * randn)`` is drawn from the task seed (``sharpness`` sets its entropy, so
  the attainable loss varies between tasks). Sequences have ``length + 1`` tokens.

Batches are ``(inputs (B, T) long, targets (B, T) long, mask (B, T) float)``; data is sampled fresh
from the batch generator, so ``train`` and ``valid`` differ only in their samples (no memorisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.tree import Params
from tasks.base import (Batch, Task, TaskConfig, TaskConfigError, TaskFamily, choice, log_int, log_uniform,
                        register_family, seeded)
from tasks.image_mlp import ACTIVATIONS
from tasks.validation import cfg_choice, cfg_float, cfg_int, data_split

SEQ_TASKS = ("copy", "reverse", "sort", "markov")
EVAL_BATCH = 256  # full_batch size: sequences are sampled, so "the whole split" is a fixed large sample


class TinyTransformerTask(Task):
    def __init__(self, config: TaskConfig):
        self.config = dict(config)
        self.seq_task = cfg_choice(config, "seq_task", "copy", SEQ_TASKS)
        self.vocab = cfg_int(config, "vocab", 8, lo=2, hi=4096)
        self.length = cfg_int(config, "length", 6, lo=1, hi=512)
        self.d_model = cfg_int(config, "d_model", 16, lo=2, hi=1024)
        self.heads = cfg_int(config, "heads", 1, lo=1, hi=64)
        self.layers = cfg_int(config, "layers", 1, lo=1, hi=8)
        self.mlp_ratio = cfg_int(config, "mlp_ratio", 4, lo=1, hi=16)
        self.act = ACTIVATIONS[cfg_choice(config, "activation", "gelu", sorted(ACTIVATIONS))]
        self.batch_size = cfg_int(config, "batch_size", 32, lo=1)
        self.init_scale = cfg_float(config, "init_scale", 1.0, lo=0.0)
        if self.d_model % self.heads:
            raise TaskConfigError(f"tiny_transformer config: d_model ({self.d_model}) must be divisible "
                                  f"by heads ({self.heads})")
        if self.seq_task == "markov":
            self.n_tokens, self.seq_len = self.vocab, self.length
            sharp = cfg_float(config, "sharpness", 2.0, lo=0.0, hi=100.0)
            g = seeded("markov", self.seed)
            self.transitions = torch.softmax(sharp * torch.randn(self.vocab, self.vocab, generator=g), -1)
            self.mask = torch.ones(self.seq_len)
        else:
            # inputs x_1..x_L, SEP, y_1..y_{L-1} (positions 0..2L-1); positions L..2L-1 (SEP onwards)
            # predict y_1..y_L
            self.n_tokens, self.seq_len = self.vocab + 1, 2 * self.length
            self.mask = (torch.arange(self.seq_len) >= self.length).float()
        self.causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).triu(1)

    # ---- data --------------------------------------------------------------------------------
    def _sequences(self, n: int, g: torch.Generator) -> Batch:
        if self.seq_task == "markov":
            state = torch.randint(self.vocab, (n,), generator=g)
            seq = [state]
            for _ in range(self.seq_len):
                state = torch.multinomial(self.transitions[state], 1, generator=g).squeeze(-1)
                seq.append(state)
            tokens = torch.stack(seq, dim=1)  # (n, T + 1)
            return tokens[:, :-1], tokens[:, 1:], self.mask.expand(n, -1)
        x = torch.randint(self.vocab, (n, self.length), generator=g)
        y = {"copy": x, "reverse": x.flip(-1), "sort": x.sort(dim=-1).values}[self.seq_task]
        sep = torch.full((n, 1), self.vocab)
        inputs = torch.cat([x, sep, y[:, :-1]], dim=1)
        # positions before the answer carry a dummy target 0 and mask 0
        targets = torch.cat([torch.zeros(n, self.length, dtype=torch.long), y], dim=1)
        return inputs, targets, self.mask.expand(n, -1)

    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        data_split(split)
        return self._sequences(self.batch_size, generator)

    def full_batch(self, split: str) -> Batch:
        return self._sequences(EVAL_BATCH, seeded("full", self.seed, data_split(split)))

    # ---- model -------------------------------------------------------------------------------
    def batch_key(self) -> None:
        """Never grouped: second derivatives through ``F.layer_norm``'s weight are wrong under
        ``torch.func.vmap`` (measured on torch 2.13: a two-step unroll's meta-gradient off by 5% in
        float64; pytorch/functorch#534, layer_norm's backward batching rule), and truncated backprop
        differentiates through the inner gradient."""
        return None

    def init(self, generator: torch.Generator) -> Params:
        d, f = self.d_model, self.mlp_ratio * self.d_model
        s = self.init_scale

        def dense(a: int, b: int) -> Tensor:
            return torch.randn(a, b, generator=generator) * (s / math.sqrt(a))

        params: Params = {
            "embed": torch.randn(self.n_tokens, d, generator=generator) * s,
            "pos": torch.randn(self.seq_len, d, generator=generator) * s,
        }
        for i in range(self.layers):
            params.update({
                f"b{i}.ln1.w": torch.ones(d), f"b{i}.ln1.b": torch.zeros(d),
                f"b{i}.qkv": dense(d, 3 * d), f"b{i}.proj": dense(d, d) / math.sqrt(2 * self.layers),
                f"b{i}.ln2.w": torch.ones(d), f"b{i}.ln2.b": torch.zeros(d),
                f"b{i}.fc1.w": dense(d, f), f"b{i}.fc1.b": torch.zeros(f),
                f"b{i}.fc2.w": dense(f, d) / math.sqrt(2 * self.layers), f"b{i}.fc2.b": torch.zeros(d),
            })
        params.update({"ln_f.w": torch.ones(d), "ln_f.b": torch.zeros(d),
                       "head.w": dense(d, self.vocab), "head.b": torch.zeros(self.vocab)})
        return params

    def _attention(self, params: Params, i: int, x: Tensor) -> Tensor:
        b, t, d = x.shape
        dh = d // self.heads
        q, k, v = (x @ params[f"b{i}.qkv"]).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, dh).transpose(1, 2) for z in (q, k, v))  # (B, H, T, dh)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        scores = scores.masked_fill(self.causal[:t, :t], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return out @ params[f"b{i}.proj"]

    def logits(self, params: Params, tokens: Tensor) -> Tensor:
        d = self.d_model
        h = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
        for i in range(self.layers):
            x = F.layer_norm(h, (d,), params[f"b{i}.ln1.w"], params[f"b{i}.ln1.b"])
            h = h + self._attention(params, i, x)
            x = F.layer_norm(h, (d,), params[f"b{i}.ln2.w"], params[f"b{i}.ln2.b"])
            h = h + self.act(x @ params[f"b{i}.fc1.w"] + params[f"b{i}.fc1.b"]) @ params[f"b{i}.fc2.w"] \
                + params[f"b{i}.fc2.b"]
        h = F.layer_norm(h, (d,), params["ln_f.w"], params["ln_f.b"])
        return h @ params["head.w"] + params["head.b"]

    def loss(self, params: Params, batch: Batch) -> Tensor:
        tokens, targets, mask = batch
        logits = self.logits(params, tokens)
        ce = F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1), reduction="none")
        mask = mask.reshape(-1)
        return (ce * mask).sum() / mask.sum()

    def accuracy(self, params: Params, batch: Batch) -> Tensor:
        tokens, targets, mask = batch
        hit = (self.logits(params, tokens).argmax(-1) == targets).float()
        return (hit * mask).sum() / mask.sum()

    @property
    def max_loss(self) -> float:
        return 1.5 * math.log(self.vocab)


@register_family("tiny_transformer")
class TinyTransformerFamily(TaskFamily):
    """d_model log-int in [min_d_model, max_d_model] (rounded to a multiple of ``heads``)."""

    def __init__(self, seq_tasks=SEQ_TASKS, vocab=(4, 16), length=(3, 8), markov_length=(8, 24),
                 min_d_model: int = 8, max_d_model: int = 32, heads=(1, 2), layers=(1, 2),
                 activations=("relu", "gelu", "silu"), batch_sizes=(16, 32, 64), init_scale=(0.5, 1.5),
                 sharpness=(0.5, 4.0)):
        self.seq_tasks, self.vocab, self.length, self.markov_length = tuple(seq_tasks), vocab, length, markov_length
        self.d_model, self.heads, self.layers = (min_d_model, max_d_model), tuple(heads), tuple(layers)
        self.activations, self.batch_sizes = tuple(activations), tuple(batch_sizes)
        self.init_scale, self.sharpness = init_scale, sharpness

    def sample(self, g: torch.Generator) -> TaskConfig:
        seq_task = choice(g, self.seq_tasks)
        heads = int(choice(g, self.heads))
        d_model = max(heads, heads * round(log_int(g, *self.d_model) / heads))
        lengths = self.markov_length if seq_task == "markov" else self.length
        cfg: TaskConfig = {
            "seq_task": seq_task,
            "vocab": int(torch.randint(self.vocab[0], self.vocab[1] + 1, (), generator=g)),
            "length": int(torch.randint(lengths[0], lengths[1] + 1, (), generator=g)),
            "d_model": int(d_model),
            "heads": heads,
            "layers": int(choice(g, self.layers)),
            "activation": choice(g, self.activations),
            "batch_size": int(choice(g, self.batch_sizes)),
            "init_scale": round(log_uniform(g, *self.init_scale), 4),
        }
        if seq_task == "markov":
            cfg["sharpness"] = round(log_uniform(g, *self.sharpness), 4)
        return cfg

    def build(self, config: TaskConfig) -> TinyTransformerTask:
        return TinyTransformerTask(config)

"""Generation over an exported Mamba LM: prefill, then one token per step, state carried explicitly.

numpy + onnxruntime only. The I/O contract comes from OUT_DIR/scan_export.json (docs/deploy.md).
Ragged batches: prompts are prefilled in groups of equal length (no padding ever enters a
recurrent state), their states are stacked, and decoding runs as one batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .contract import DESCRIPTION_FILE, FORMAT, LOGITS_TO_KEEP, read_description  # noqa: F401 (re-exported)
from .session import make_session

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class ExportedMamba:
    """An export directory loaded on one onnxruntime provider."""

    def __init__(self, export_dir, provider: str = "cpu", threads: int | None = None):
        export_dir = Path(export_dir)
        self.description = read_description(export_dir)
        self.export_dir = export_dir
        self.vocab_size = int(self.description["vocab_size"])
        self.session = make_session(export_dir / self.description["model_file"], provider, threads=threads)
        state_names = {s[kind]["input"] for s in self.description["state"] for kind in ("conv_state", "ssm_state")}
        self.state_inputs = [i for i in self.description["inputs"] if i["name"] in state_names]
        self.state_outputs = [o["name"] for o in self.description["outputs"] if o["name"] != "logits"]
        # Exports before format version 2 have no logits_to_keep input; forward() slices instead.
        self.takes_logits_to_keep = any(i["name"] == LOGITS_TO_KEEP for i in self.description["inputs"])

    def zero_state(self, batch: int) -> list[np.ndarray]:
        """The state a new sequence starts from: zeros, in the graph's input order."""
        return [np.zeros([batch if d == "batch" else d for d in s["shape"]], NP_DTYPES[s["dtype"]])
                for s in self.state_inputs]

    def check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, seqlen) with seqlen >= 1, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max()) if ids.max() >= self.vocab_size else int(ids.min())
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}) (vocab_size), got token id {bad}")
        return ids.astype(np.int64)

    def forward(self, input_ids, state: list[np.ndarray], logits_to_keep: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids: (b, l) -> logits: (b, l, V) float32, and the state after the last position.

        logits_to_keep: 0 for every position's logits, k > 0 for the last k only (transformers'
        convention); a prefill for generation needs 1, and skips most of the lm_head."""
        ids = self.check_ids(input_ids)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        feeds = {"input_ids": ids, **{s["name"]: v for s, v in zip(self.state_inputs, state)}}
        if self.takes_logits_to_keep:
            feeds[LOGITS_TO_KEEP] = np.array(logits_to_keep, np.int64)
        logits, *new_state = self.session.run(["logits", *self.state_outputs], feeds)
        if logits_to_keep and not self.takes_logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits.astype(np.float32, copy=False), new_state


@dataclass(frozen=True)
class Sampling:
    """Greedy when do_sample is False; otherwise temperature, then top-k, then top-p, seeded."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits: (b, V) -> (b,) token ids."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(scores, axis=-1)[:, -min(sampling.top_k, scores.shape[-1])][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < sampling.top_p  # always keeps the top token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def prefill(model: ExportedMamba, prompts: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run each group of equal-length prompts at once. -> (last logits: (b, V), state for all b rows)."""
    groups = defaultdict(list)
    for row, prompt in enumerate(prompts):
        groups[len(prompt)].append(row)
    last_logits = np.zeros((len(prompts), model.vocab_size), np.float32)
    state = None
    for length, rows in groups.items():
        logits, group_state = model.forward(np.array([prompts[r] for r in rows]), model.zero_state(len(rows)), logits_to_keep=1)
        last_logits[rows] = logits[:, -1]
        if state is None:
            state = [np.zeros((len(prompts), *s.shape[1:]), s.dtype) for s in group_state]
        for full, part in zip(state, group_state):
            full[rows] = part
    return last_logits, state


def generate(model: ExportedMamba, prompts: list[list[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), stop_token_id: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (a stop token, when hit, is the last one returned).

    on_token(row, token_id) streams each token as it is chosen.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token")
        model.check_ids(np.array([prompt]))
    rng = np.random.default_rng(sampling.seed)
    out = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return out
    logits, state = prefill(model, prompts)
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, sampling, rng)
        for row, tok in enumerate(tokens):
            if not done[row]:
                out[row].append(int(tok))
                if on_token is not None:
                    on_token(row, int(tok))
                if stop_token_id is not None and tok == stop_token_id:
                    done[row] = True
        if done.all() or step == max_new_tokens - 1:
            break
        step_logits, state = model.forward(tokens[:, None], state)
        logits = step_logits[:, -1]
    return out

"""Generation over an exported Mamba or hybrid LM: prefill, then one token per step, state carried explicitly.

numpy + onnxruntime only (tokenizers for text). The I/O contract comes from OUT_DIR/scan_export.json
(docs/deploy.md). Ragged batches: prompts are prefilled in groups of equal length (no padding ever
enters a recurrent state), their states are stacked, and decoding runs as one batch. Hybrid exports
also carry KV caches: stacking left-pads the shorter groups' caches with zeros, and the attention
mask, carried as the last element of the state, marks those positions 0.

    from scan_export.runtime import ExportedModel, Sampling, generate
    model = ExportedModel("out")                       # share it between threads freely
    generate(model, "Hello", 20)                       # -> [[new ids]] (needs out/tokenizer.json)
    generate(model, [[5, 6, 7], [9, 10]], 20)          # -> [[...], [...]], one row per prompt
    generate_text(model, ["Hello", "Bonjour"], 20)     # -> ["...", "..."], the new text per prompt
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ScanExportError, describe_value
from .binding import BoundDecoder, PlainDecoder
from ..contract import (ATTENTION_MASK, DESCRIPTION_FILE, FORMAT, LOGITS_TO_KEEP, check_graph_matches,  # noqa: F401
                       read_description)
from .session import make_session, run_checked
from .streaming import TextStreams
from .tokenizer import load_tokenizer

NP_DTYPES = {"float32": np.float32, "float16": np.float16}
# The most tokens one generate() call adds per row: a count that cannot finish (10**20) is refused
# up front rather than looping for ever; a million tokens is hours of decoding on any host.
MAX_NEW_TOKENS = 1_000_000
PROMPTS_EXPECTED = ("a str, a list of str, token ids (a list of ints or a 1-D integer array), or one row of "
                    "token ids per prompt (a list of lists of ints or a 2-D integer array)")


def state_tensors(description: dict) -> list[dict]:
    """Every state tensor of a description: the dicts with an "input" in each `state` entry
    (conv_state / ssm_state for Mamba layers, key / value for attention layers)."""
    return [t for entry in description["state"] for t in entry.values() if isinstance(t, dict) and "input" in t]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


class ExportedModel:
    """An export directory loaded on one onnxruntime provider.

    export_dir: a `scan-export export-model` output (scan_export.json, model.onnx, maybe
    tokenizer.json). provider: "cpu" or "cuda" (asserted, never a silent fallback). threads:
    onnxruntime intra-op threads (None = its default). io_binding: decode with the state kept on
    the device between steps, in preallocated buffers swapped each step, copying only the logits
    row back (runtime/binding.py); None = on for CUDA, off for CPU (where it gives the same tokens,
    tested, and no speed-up to speak of).

    Thread-safe: one instance may serve many threads at once (generate, generate_text, forward).
    It keeps no per-call state: onnxruntime's InferenceSession.run may be called concurrently,
    each generate() call carries its own state and random generator, and the tokenizer is loaded
    once under a lock. Measured: 4 threads generating different prompts on one instance give the
    tokens they give one after another (tests/test_runtime_api.py).
    """

    def __init__(self, export_dir, provider: str = "cpu", threads: int | None = None, io_binding: bool | None = None):
        export_dir = Path(export_dir)
        # io_binding: decode with the state kept on the device (runtime/binding.py); None = on CUDA only.
        self.io_binding = provider == "cuda" if io_binding is None else bool(io_binding)
        self.description = read_description(export_dir)
        self.export_dir = export_dir
        self.vocab_size = int(self.description["vocab_size"])
        self.model_path = export_dir / self.description["model_file"]
        self.session = make_session(self.model_path, provider, threads=threads)
        check_graph_matches(self.description, self.session, self.model_path)
        state_names = {t["input"] for t in state_tensors(self.description)}
        self.state_inputs = [i for i in self.description["inputs"] if i["name"] in state_names]
        self.state_outputs = [o["name"] for o in self.description["outputs"] if o["name"] != "logits"]
        # Hybrid exports (format version 4): the graph takes attention_mask (batch, past + seqlen), and
        # the state list ends with the mask over the cached positions, (batch, past) int64.
        self.takes_attention_mask = any(i["name"] == ATTENTION_MASK for i in self.description["inputs"])
        # Per state element: the axis that grows with the sequence (KV caches, the mask), or None.
        self.seq_axes = [s["shape"].index("past_seqlen") if "past_seqlen" in s["shape"] else None
                         for s in self.state_inputs] + ([1] if self.takes_attention_mask else [])
        # Exports before format version 2 have no logits_to_keep input; forward() slices instead.
        self.takes_logits_to_keep = any(i["name"] == LOGITS_TO_KEEP for i in self.description["inputs"])
        # tokenizer.json is read on first use only, so token-id callers never need it (nor a sound one).
        self._tokenizer = None
        self._tokenizer_loaded = False
        self._tokenizer_lock = threading.Lock()

    @property
    def tokenizer(self):
        """The export's tokenizers.Tokenizer, loaded on first use; None when the export has no
        tokenizer.json. A corrupt file raises ScanExportError naming it, here and not before."""
        with self._tokenizer_lock:
            if not self._tokenizer_loaded:
                self._tokenizer = load_tokenizer(self.export_dir)
                self._tokenizer_loaded = True
        return self._tokenizer

    def require_tokenizer(self, needed_by: str):
        """self.tokenizer, or ScanExportError saying that needed_by needs the missing tokenizer.json."""
        tokenizer = self.tokenizer
        if tokenizer is None:
            load_tokenizer(self.export_dir, required=True, needed_by=needed_by)  # raises the one message
        return tokenizer

    def zero_state(self, batch: int) -> list[np.ndarray]:
        """The state a new sequence starts from, in the graph's input order: zeros, KV caches with
        past_seqlen 0, and for hybrid exports the (batch, 0) attention mask last."""
        state = [np.zeros([batch if d == "batch" else 0 if d == "past_seqlen" else d for d in s["shape"]],
                          NP_DTYPES[s["dtype"]]) for s in self.state_inputs]
        if self.takes_attention_mask:
            state.append(np.zeros((batch, 0), np.int64))
        return state

    def check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids: (b, l) integers in [0, vocab_size) -> int64 (b, l); else ScanExportError."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ScanExportError(f"input_ids must be (batch, seqlen) with seqlen >= 1, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ScanExportError(f"input_ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max()) if ids.max() >= self.vocab_size else int(ids.min())
            raise ScanExportError(f"input_ids must lie in [0, {self.vocab_size}) (vocab_size), got token id {bad}")
        return ids.astype(np.int64)

    def forward(self, input_ids, state: list[np.ndarray], logits_to_keep: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids: (b, l) -> logits: (b, l, V) float32, and the state after the last position.

        state: zero_state(b) for a new sequence, or what the previous forward() returned (the
        arrays of scan_export.json's state inputs, in their order, then for hybrid exports the
        attention mask over the cached positions; never modified in place).
        logits_to_keep: 0 for every position's logits, k > 0 for the last k only (transformers'
        convention); a prefill for generation needs 1, and skips most of the lm_head.
        Thread-safe: concurrent calls each carry their own state."""
        ids = self.check_ids(input_ids)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ScanExportError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        feeds = {"input_ids": ids, **{s["name"]: v for s, v in zip(self.state_inputs, state)}}
        if self.takes_attention_mask:
            # The new tokens are always real: 1s after the cached positions' mask.
            mask = np.concatenate([state[-1], np.ones(ids.shape, np.int64)], axis=1)
            feeds[ATTENTION_MASK] = mask
        if self.takes_logits_to_keep:
            feeds[LOGITS_TO_KEEP] = np.array(logits_to_keep, np.int64)
        logits, *new_state = run_checked(self.session, ["logits", *self.state_outputs], feeds, self.model_path)
        if self.takes_attention_mask:
            new_state.append(mask)
        if logits_to_keep and not self.takes_logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits.astype(np.float32, copy=False), new_state


@dataclass(frozen=True)
class Sampling:
    """Greedy when do_sample is False; otherwise temperature, then top-k, then top-p, seeded.

    temperature > 0 divides the logits; top_k: keep the k best (0 = all); top_p in (0, 1]: keep the
    smallest set of best tokens whose probability reaches p; seed: the generator's seed, one per
    generate() call (None = fresh entropy). Frozen, so one Sampling may be shared between threads."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.do_sample and self.temperature <= 0:
            raise ScanExportError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ScanExportError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ScanExportError(f"top_k must be >= 0, got {self.top_k}")


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


def prefill(model: ExportedModel, prompts: list[list[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run each group of equal-length prompts at once. -> (last logits: (b, V), state for all b rows).

    Groups' states are stacked along the batch; tensors that grow with the sequence (KV caches and
    the attention mask) are left-padded with zeros to the longest group, so the mask marks the pads 0."""
    groups = defaultdict(list)
    for row, prompt in enumerate(prompts):
        groups[len(prompt)].append(row)
    last_logits = np.zeros((len(prompts), model.vocab_size), np.float32)
    parts = []
    for length, rows in groups.items():
        logits, group_state = model.forward(np.array([prompts[r] for r in rows]), model.zero_state(len(rows)), logits_to_keep=1)
        last_logits[rows] = logits[:, -1]
        parts.append((rows, group_state))
    state = []
    for j, axis in enumerate(model.seq_axes or [None] * len(parts[0][1])):
        first = parts[0][1][j]
        shape = [len(prompts), *first.shape[1:]]
        if axis is not None:
            shape[axis] = max(part[j].shape[axis] for _, part in parts)
        full = np.zeros(shape, first.dtype)
        for rows, part in parts:
            if axis is None:
                full[rows] = part[j]
            else:  # right-aligned along the sequence axis: the pads come first
                index = [slice(None)] * full.ndim
                index[axis] = slice(shape[axis] - part[j].shape[axis], None)
                full[(rows, *index[1:])] = part[j]
        state.append(full)
    return last_logits, state


def as_prompts(model: ExportedModel, prompts) -> list[list[int]]:
    """Every form generate() takes -> one list of token ids per prompt (checked against the vocab).

    A str (or a list of str) goes through model.tokenizer; a flat list of ints or a 1-D integer
    array is one prompt; a list of lists of ints or a 2-D integer array is one prompt per row."""
    if isinstance(prompts, str):
        return [_encode(model, prompts, 0)]
    if isinstance(prompts, np.ndarray):
        if not np.issubdtype(prompts.dtype, np.integer):
            raise ScanExportError(f"prompts: expected {PROMPTS_EXPECTED}, got a numpy array of dtype {prompts.dtype}")
        if prompts.ndim not in (1, 2):
            raise ScanExportError(f"prompts: expected {PROMPTS_EXPECTED}, got a {prompts.ndim}-D array of shape {prompts.shape}")
        rows = [prompts] if prompts.ndim == 1 else list(prompts)
    elif isinstance(prompts, (list, tuple)) and prompts:
        first = prompts[0]
        if _is_int(first):
            rows = [prompts]
        elif isinstance(first, str):
            rows = []
            for row, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise ScanExportError(f"prompts: a list of str has item {row} = {describe_value(p)}; expected a str")
                rows.append(_encode(model, p, row))
        elif isinstance(first, (list, tuple, np.ndarray)):
            rows = list(prompts)
        else:
            raise ScanExportError(f"prompts: expected {PROMPTS_EXPECTED}, got {describe_value(prompts)}")
    else:
        raise ScanExportError(f"prompts: expected {PROMPTS_EXPECTED}, got {describe_value(prompts)}")
    return [_token_row(model, p, row) for row, p in enumerate(rows)]


def _encode(model: ExportedModel, text: str, row: int) -> list[int]:
    ids = model.require_tokenizer("a str in prompts").encode(text).ids
    if not ids:
        raise ScanExportError(f"prompts: prompt {row} is empty: {describe_value(text)} encodes to no tokens; "
                              f"expected at least one token")
    return ids


def _token_row(model: ExportedModel, p, row: int) -> list[int]:
    """One prompt's ids as a list of ints, or ScanExportError naming prompts, the row and the culprit."""
    if isinstance(p, np.ndarray):
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer):
            raise ScanExportError(f"prompts: prompt {row} should be a 1-D integer array, got shape {p.shape} dtype {p.dtype}")
        p = p.tolist()
    elif not isinstance(p, (list, tuple)):
        raise ScanExportError(f"prompts: prompt {row} should be a list of token ids like the ones before it, "
                              f"got {describe_value(p)}")
    if len(p) == 0:
        raise ScanExportError(f"prompts: prompt {row} is empty; every prompt needs at least one token, got {list(p)}")
    for i, t in enumerate(p):
        if not _is_int(t):
            raise ScanExportError(f"prompts: prompt {row} has {describe_value(t)} at position {i}; expected int token ids")
    ids = [int(t) for t in p]
    bad = next((t for t in ids if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise ScanExportError(f"prompts: prompt {row}: input_ids must lie in [0, {model.vocab_size}) (vocab_size), "
                              f"got token id {bad}")
    return ids


def cache_bytes_per_token(model: ExportedModel) -> int:
    """Bytes the KV caches grow by per token of one row (0 for recurrent-only exports): every state
    tensor with a past_seqlen axis, plus the int64 attention mask."""
    total = 0
    for s in model.state_inputs:
        if "past_seqlen" in s["shape"]:
            total += int(np.prod([d for d in s["shape"] if isinstance(d, int)])) * np.dtype(NP_DTYPES[s["dtype"]]).itemsize
    return total + (8 if model.takes_attention_mask and total else 0)


def check_cache_fits(model: ExportedModel, batch: int, tokens: int) -> None:
    """Refuse, before any work, a generation whose KV caches alone would not fit in memory."""
    from ..resources import require_memory

    require_memory(cache_bytes_per_token(model) * batch * tokens,
                   f"max_new_tokens: {tokens} tokens x {batch} rows of KV cache", "generate fewer tokens")


def generate(model: ExportedModel, prompts, max_new_tokens: int, *,
             sampling: Sampling = Sampling(), stop_token_id: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """The new token ids of each prompt: always list[list[int]], one row per prompt, in order, the
    prompt itself not included (a stop token, when hit, is the last one of its row).

    prompts: one prompt or a batch, as
      - str, or list[str] (b prompts): encoded with model.tokenizer (the export's tokenizer.json);
      - list[int] or a 1-D integer array (l,): one prompt of token ids -> one row back;
      - list[list[int]] (ragged allowed) or a 2-D integer array (b, l): one prompt per row.
      Ids lie in [0, model.vocab_size); every prompt has at least one token.
    max_new_tokens: int >= 0, the most tokens added to each row.
    sampling: greedy by default; Sampling(do_sample=True, ..., seed=S) samples reproducibly.
    stop_token_id: a row ends after producing it (None: rows run to max_new_tokens).
    on_token(row, token_id): called for each token as it is chosen, on the calling thread; for text,
      feed it a streaming.TextStreams (or use generate_text with on_text).

    Thread-safe: many threads may call generate on one shared model at once (see ExportedModel).
    """
    if not _is_int(max_new_tokens) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ScanExportError(f"max_new_tokens must be an int in [0, {MAX_NEW_TOKENS}], got {describe_value(max_new_tokens)}")
    if stop_token_id is not None and not _is_int(stop_token_id):
        raise ScanExportError(f"stop_token_id must be an int token id or None, got {describe_value(stop_token_id)}")
    if not isinstance(sampling, Sampling):
        raise ScanExportError(f"sampling must be a Sampling(...), got {describe_value(sampling)}")
    prompts = as_prompts(model, prompts)
    check_cache_fits(model, len(prompts), max(map(len, prompts), default=0) + max_new_tokens)
    rng = np.random.default_rng(sampling.seed)
    out = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return out
    logits, state = prefill(model, prompts)
    decoder = None  # made on the first decode step: a one-token generation needs none
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
        if decoder is None:
            decoder = (BoundDecoder if model.io_binding else PlainDecoder)(model, state)
        logits = decoder(tokens)
    return out


def generate_text(model: ExportedModel, prompts, max_new_tokens: int, *,
                  sampling: Sampling = Sampling(), stop_token_id: int | None = None,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """generate(), decoded: the new text of each prompt, list[str] with one entry per prompt.

    Takes the prompts generate() takes and needs the export's tokenizer.json. on_text(row, piece)
    streams each row's text as it becomes stable (streaming.TextStream); a row's pieces joined equal
    its returned text. Thread-safe as generate() is.
    """
    tokenizer = model.require_tokenizer("generate_text")
    rows = as_prompts(model, prompts)
    streams = TextStreams(tokenizer, len(rows)) if on_text is not None else None

    def stream(row, tok):
        if piece := streams.put(row, tok):
            on_text(row, piece)

    tokens = generate(model, rows, max_new_tokens, sampling=sampling, stop_token_id=stop_token_id,
                      on_token=stream if streams else None)
    if streams:
        for row, piece in enumerate(streams.end()):
            if piece:
                on_text(row, piece)
    return [tokenizer.decode(t) for t in tokens]

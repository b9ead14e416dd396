"""Train the byte-level quality fixtures: a small Mamba and a small Mamba-2 on English text that ships
with every machine (no download), saved as HF checkpoints `scan-export export-model` accepts.

    PYTHONPATH=$PWD python3 tools/train_fixture.py --out tests/fixtures

writes OUT/mamba-bytes/ and OUT/mamba2-bytes/ (config.json, model.safetensors, tokenizer.json,
train_log.json) and OUT/bytes-heldout.txt (the held-out split, read as bytes by tests/test_quality.py).

Corpus, fixed order: the regular files of /usr/share/common-licenses (symlinks skipped: they repeat
files), sorted by name, then the values of Python's pydoc_data.topics.topics sorted by key; each
document is followed by two newlines, all encoded as UTF-8. Split: the corpus is cut into 4096-byte
blocks and block i is held out when i % 20 == 19 (5 %, spread over both sources); the training
stream is the other blocks in order. Both sources differ between machines and Python versions, so
the held-out split is stored with the fixtures and the corpus's sha256 is recorded in the log.

Training runs on the CPU with the project's reference MambaLM (its chunked scans have autograd and
are far faster on a CPU than transformers' slow path; the parameter names are transformers' own),
initialised from transformers' MambaForCausalLM / Mamba2ForCausalLM with the same seed, so the
saved checkpoint is exactly what transformers' `save_pretrained` writes. Vocabulary: the 256 bytes,
token id = byte value, no special tokens (a multiple of 8 already).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LICENSES = Path("/usr/share/common-licenses")
BLOCK = 4096
HOLD_OUT_EVERY = 20  # block i is held out when i % 20 == 19
VOCAB = 256
SEED = 0
# Per model: about 3-4 min of one CPU core (a Mamba-2 step costs ~1.3x a Mamba step on this CPU).
STEPS = {"mamba": 80, "mamba2": 64}
# Hidden sizes are multiples of 32 so every weight MatMul splits into whole quantization blocks of 32.
CONFIGS = {
    "mamba": dict(hidden_size=128, state_size=16, num_hidden_layers=4, expand=2, conv_kernel=4),
    "mamba2": dict(hidden_size=128, state_size=32, num_hidden_layers=4, expand=2, conv_kernel=4,
                   num_heads=8, head_dim=32, n_groups=1, chunk_size=64),
}


def corpus_documents() -> list[tuple[str, str]]:
    """[(name, text)] in the fixed order described in the module docstring."""
    import pydoc_data.topics

    docs = [(f"common-licenses/{p.name}", p.read_text(encoding="utf-8"))
            for p in sorted(LICENSES.iterdir()) if p.is_file() and not p.is_symlink()]
    topics = pydoc_data.topics.topics
    docs += [(f"pydoc_data.topics[{k!r}]", topics[k]) for k in sorted(topics)]
    return docs


def corpus_split(corpus: bytes) -> tuple[bytes, bytes]:
    """-> (train, heldout): 4096-byte blocks, every 20th (i % 20 == 19) held out."""
    blocks = [corpus[i:i + BLOCK] for i in range(0, len(corpus), BLOCK)]
    held = [b for i, b in enumerate(blocks) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    train = [b for i, b in enumerate(blocks) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return b"".join(train), b"".join(held)


def byte_tokenizer_json() -> str:
    """A tokenizers file whose token id is the byte value and whose decode gives the bytes back:
    byte-level BPE with GPT-2's byte→character map, no merges, no regex split, no prefix space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tok = Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    sample = "Licence: « ü → ok »\n\tend  "
    assert tok.encode(sample).ids == list(sample.encode()) and tok.decode(list(sample.encode())) == sample
    return tok.to_str(pretty=True)


def hf_model(model_type: str):
    import transformers as tf

    config_cls, model_cls = {"mamba": (tf.MambaConfig, tf.MambaForCausalLM),
                             "mamba2": (tf.Mamba2Config, tf.Mamba2ForCausalLM)}[model_type]
    config = config_cls(vocab_size=VOCAB, **CONFIGS[model_type], tie_word_embeddings=True,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return model_cls(config)


@torch.no_grad()
def torch_bits_per_byte(model, data: bytes, dtype=torch.float64) -> float:
    """Held-out bits per byte of a transformers model: mean over positions 1..n-1 of -log2 p(x_t | x_<t)
    (the first byte has no prediction: no BOS), one forward over the whole text in `dtype`."""
    model = model.to(dtype).eval()
    ids = torch.tensor([list(data)])
    logits = model(ids, use_cache=False).logits[0, :-1].to(torch.float64)
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll) / math.log(2) / (len(data) - 1)


def train(model_type: str, train_bytes: bytes, steps: int, batch: int, seqlen: int, lr: float, threads: int, log):
    from scan_export.reference.models import MambaLM, MambaLMConfig

    torch.manual_seed(SEED)
    hf = hf_model(model_type)  # transformers' own initialisation (A_log, dt bias, ...)
    model = MambaLM(MambaLMConfig.from_hf(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)  # strict=False: MambaLM names lm_head; HF ties it
    model.lm_head.weight = model.backbone.embeddings.weight
    model.train()
    data = torch.tensor(list(train_bytes), dtype=torch.long)
    gen = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, cosine down to 10 %
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    losses, start, cpu_start = [], time.perf_counter(), time.process_time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seqlen - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + seqlen + 1] for s in starts.tolist()])  # (b, l+1)
        logits = model(window[:, :-1], *model.zero_state(batch))[0]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item() / math.log(2))
        if step % 25 == 0 or step == steps - 1:
            log(f"{model_type} step {step:4d} loss {losses[-1]:.3f} bits/byte  {time.perf_counter() - start:6.1f} s "
                f"wall  {time.process_time() - cpu_start:6.1f} s cpu")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    return hf, losses, seconds, cpu_seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write mamba-bytes/, mamba2-bytes/ and the held-out split into")
    ap.add_argument("--model-types", default="mamba,mamba2")
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default per model: {STEPS})")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared 2-core machine more threads only add contention, "
                         "and the fixtures were made with 1 (the thread count can change rounding)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    docs = corpus_documents()
    corpus = "".join(text + "\n\n" for _, text in docs).encode("utf-8")
    train_bytes, held = corpus_split(corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bytes-heldout.txt").write_bytes(held)
    tokenizer = byte_tokenizer_json()
    print(f"corpus {len(corpus)} bytes from {len(docs)} documents, sha256 {hashlib.sha256(corpus).hexdigest()[:16]}; "
          f"train {len(train_bytes)}, held out {len(held)}", flush=True)
    for model_type in args.model_types.split(","):
        steps = args.steps or STEPS[model_type]
        hf, losses, seconds, cpu_seconds = train(model_type, train_bytes, steps, args.batch, args.seqlen, args.lr,
                                    args.threads, lambda s: print(s, flush=True))
        out = args.out / f"{model_type}-bytes"
        hf.save_pretrained(out)
        (out / "tokenizer.json").write_text(tokenizer)
        bpb = torch_bits_per_byte(hf, held, torch.float32)
        record = {
            "model_type": model_type, "config": CONFIGS[model_type], "vocab_size": VOCAB, "seed": SEED,
            "steps": steps, "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr, "threads": args.threads,
            "train_wall_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu_seconds, 1), "parameters": sum(p.numel() for p in hf.parameters()),
            "final_train_bits_per_byte_last20": round(sum(losses[-20:]) / 20, 4),
            "heldout_bits_per_byte_transformers_float32": round(bpb, 5),
            "corpus": {"documents": [name for name, _ in docs], "bytes": len(corpus),
                       "sha256": hashlib.sha256(corpus).hexdigest(), "train_bytes": len(train_bytes),
                       "heldout_bytes": len(held), "split": "4096-byte blocks, block i held out when i % 20 == 19"},
            "torch": torch.__version__, "transformers": transformers.__version__,
        }
        (out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{model_type}: {seconds:.0f} s wall, {cpu_seconds:.0f} s cpu, final train {record['final_train_bits_per_byte_last20']} bits/byte, "
              f"held-out {bpb:.4f} bits/byte (transformers, float32)", flush=True)


if __name__ == "__main__":
    main()

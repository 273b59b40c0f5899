"""Train the built-in `tiny-trained` model: a small byte-level Llama on the King James Bible.

    .venv/bin/python scripts/train_tiny.py                    # ~10 min on one core
    .venv/bin/python scripts/train_tiny.py --steps 20 --out /tmp/tiny   # a quick try

Reads data/kjv/genesis-matthew.txt (public domain, see data/kjv/README.md), trains
`transformers.LlamaForCausalLM` (the test extras install it) with plain torch on one
thread, and writes ppruntime/model/data/tiny-trained/{config.json, model.safetensors}
(weights in bfloat16). Everything random comes from --seed, so a rerun with the same
torch on the same kind of CPU gives the same weights (the shipped model.safetensors
came out byte for byte again from a second full run).

Tokens are the preset byte vocabulary: ids 0..255 are bytes, 256 is BOS, 257 EOS
(vocab_size 512, the same id space as the random `tiny` preset). Each training window
starts with BOS at the beginning of a verse, as a prompt does at inference.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXT = REPO_ROOT / "data" / "kjv" / "genesis-matthew.txt"
OUT = REPO_ROOT / "ppruntime" / "model" / "data" / "tiny-trained"
BOS_ID, EOS_ID, VOCAB_SIZE = 256, 257, 512

MODEL_SHAPE = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "tie_word_embeddings": False,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window, BOS included")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def line_starts(data: torch.Tensor, window: int) -> torch.Tensor:
    """Offsets of the lines (verses) that have `window` bytes after them."""
    newline = (data == ord("\n")).nonzero().flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), newline])
    return starts[starts + window <= len(data)]


def batch_of(data: torch.Tensor, starts: torch.Tensor, size: int, seq_len: int, generator):
    picks = starts[torch.randint(len(starts), (size,), generator=generator)]
    body = torch.stack([data[s : s + seq_len - 1] for s in picks.tolist()])  # [B, T-1]
    bos = torch.full((size, 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, body], dim=1)  # [B, T]


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_text(model, prompt: str, tokens: int = 48) -> str:
    ids = torch.tensor([[BOS_ID, *prompt.encode()]])
    with torch.no_grad():
        for _ in range(tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    generated = [t for t in ids[0, 1:].tolist() if t < 256]
    return bytes(generated).decode("utf-8", errors="replace")


def main() -> None:
    import transformers

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = torch.frombuffer(bytearray(args.text.read_bytes()), dtype=torch.uint8).long()
    starts = line_starts(data, args.seq_len)
    probe = batch_of(data, starts, 32, args.seq_len, torch.Generator().manual_seed(99))

    config = transformers.LlamaConfig(**MODEL_SHAPE)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {len(data)} bytes of text")
    began = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        batch = batch_of(data, starts, args.batch_size, args.seq_len, generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():
                probe_loss = model(input_ids=probe, labels=probe).loss.item()
            print(
                f"step {step:5d}  loss {loss.item():.3f}  probe {probe_loss:.3f}  "
                f"{time.perf_counter() - began:6.0f} s",
                flush=True,
            )
    model.eval()
    for prompt in ("In the beginning", "And Jesus said", "hello"):
        print(f"{prompt!r} -> {sample_text(model, prompt)!r}")
    save(model, args)


def save(model, args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
    }
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **MODEL_SHAPE,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "trained_by": "scripts/train_tiny.py",
        "training": {
            "text": str(args.text.relative_to(REPO_ROOT))
            if args.text.is_relative_to(REPO_ROOT)
            else str(args.text),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "seed": args.seed,
        },
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

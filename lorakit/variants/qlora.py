"""QLoRA: LoRA on every linear layer of a frozen 4-bit NF4 base. Dettmers et al., 2023, arXiv:2305.14314.

Eq. 5: ``Y = X doubleDequant(c1, c2, W_NF4) + s X L1 L2``, i.e. ``y = W0' x + b0 + s * B (A dropout(x))``
with ``W0'`` the base weight stored in NF4 (blocks of 64, absmax scales double-quantised to 8 bits in
blocks of 256) and dequantised to the compute dtype (bf16) on every forward; ``A (r, d_in)``,
``B (d_out, r)``, ``s = alpha / r``. Gradients flow through the 4-bit weight to the input, never into it.
"Linear layers" are ``nn.Linear`` and GPT-2's ``Conv1D`` (``y = x W + b``, ``W`` stored ``(in, out)``), whose
weight is quantised transposed, as ``(out, in)``, as bitsandbytes' integration in transformers does.

The 4-bit base is part of the variant: :func:`lorakit.apply` reads the config's ``base_storage()``
and quantises the target layers (:func:`lorakit.adapters.quantize.quantize_targets`) before wrapping them, so
the saved ``adapter.json`` says how to rebuild the base and loading onto a fresh full-precision model
reproduces the trained one exactly (NF4 quantisation is deterministic). The fingerprint is taken on the
quantised buffers: a base quantised with other settings is refused. Layers quantised beforehand with
:func:`lorakit.quantize` are used as they are when their settings match the config.

Defaults are the paper's hyperparameters (as in the authors' finetune_guanaco_*.sh): ``r = 64``,
``alpha = 16``, adapters on all linear layers (the output head excluded), dropout 0.1 for 7B/13B models
(0.05 for 33B/65B). Their training recipe, set in the training config rather than here: paged AdamW
(``optimizer: paged_adamw``), lr 2e-4 (1e-4 from 33B), max grad norm 0.3, constant schedule, gradient
checkpointing. The adapter runs in the activations' dtype with fp32 parameters.

Step 0: ``B = 0``, so the adapted model equals the 4-bit base exactly (quantising is a change of the base,
made before the adapter exists; it is not part of the adapter's update).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.core.config import BaseStorage, require
from lorakit.core.kinds import MATRIX_KINDS
from lorakit.variants.lora import LORA_PEFT, LoRA, LoRAConfig

# The dtypes an NF4 layer can dequantise to (as names, so the config stays JSON).
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class QLoRAConfig(LoRAConfig):
    """QLoRA: LoRA fields with the paper's defaults, plus how the base is stored.

    ``base_quantization``: ``"nf4"`` (4-bit NormalFloat), or None to train on the base as given.
    ``compute_dtype``: dtype the 4-bit weights are dequantised to for the matmul (paper: bfloat16).
    ``double_quant``: quantise the block scales again to 8 bits (0.5 -> 0.127 bits per weight).
    """

    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    targets: str | list[str] = "all-linear"
    base_quantization: str | None = "nf4"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True

    def validate(self) -> None:
        super().validate()
        if isinstance(self.compute_dtype, torch.dtype):  # accept torch.bfloat16; store its name
            self.compute_dtype = str(self.compute_dtype).removeprefix("torch.")
        ok = self.base_quantization in ("nf4", None)
        require(ok, "base_quantization", self.base_quantization, "'nf4', or null (the base as it is)")
        ok = self.compute_dtype in COMPUTE_DTYPES
        require(ok, "compute_dtype", self.compute_dtype, f"one of {', '.join(COMPUTE_DTYPES)}")
        require(isinstance(self.double_quant, bool), "double_quant", self.double_quant, "True or False")

    def base_storage(self) -> BaseStorage | None:
        if self.base_quantization is None:
            return None
        return BaseStorage(self.base_quantization, self.compute_dtype, self.double_quant)


class QLoRA(LoRA):
    """LoRA (``dW = (alpha / r) B A``) whose target layers are stored in NF4 when applied."""

    name = "qlora"
    config_class = QLoRAConfig
    summary = "LoRA on every linear layer of a 4-bit NF4 base (double-quantised scales, bf16 compute)"
    paper = "arXiv:2305.14314"
    # NF4 stores linear weights (nn.Linear, GPT-2 Conv1D transposed); other kinds are not adapted.
    kinds = MATRIX_KINDS
    peft = LORA_PEFT  # the factors of a LoRA; PEFT loads the base in 4 bits itself

"""Fast paths: kernels that compute a variant's math with less time or memory, and the one policy that picks
them.

Every variant's forward is plain PyTorch in its own file, readable against its paper; that is the reference
and what runs wherever no kernel covers a case. A kernel is registered (:mod:`lorakit.kernels.registry`) for
a computation form a variant declares (:mod:`lorakit.core.forms`: low-rank factors, DoRA's magnitude and
direction, Kronecker factors) or for another named computation (dropout's mask), with the devices, dtypes,
layer kinds and dropout rates it covers, and is tested against the plain form on each of them:

- ``lowrank``: the LoRA family's ``W0 x + b0 + s B (A x~)`` saving only the input and a 1-byte mask (nothing
  input-sized with ``A`` frozen), forming the base output in the same function on a plain frozen layer;
  ``lowrank_positions`` (CPU, fp32/fp64, ``p <= 0.25``) takes the masked products from the dropped inputs.
- ``dora`` / ``dora_positions``: DoRA as one fused function (likewise).
- ``kronecker``: LoKr's ``kron(W1, W2) x`` as ``W1 X W2^T`` without forming the weight.
- ``gap_mask`` (CPU, ``p <= 0.25``): dropout's mask drawn as the gaps between dropped elements.
- ``fused_linear_cross_entropy``: a causal LM's loss through its output head a chunk of rows at a time, the
  gradients formed in forward, so no full-vocabulary logits are ever held (a model-level kernel, asked by
  :mod:`lorakit.engine.token_loss`).

Switching them off: set ``LORAKIT_KERNELS=off`` in the environment before importing lorakit, call
``lorakit.kernels.enable(False)`` (``enable(True)`` switches them back on), or run a block under
``with lorakit.kernels.plain():``. Off, every variant runs its plain form, which gives the same results up to
float rounding; dropout then draws its plain mask, so masks differ from those drawn with the kernels on.
``lorakit.kernels.enabled()`` says whether they are on (any kernel asks it, a model-level one too).

Nothing imports this package but ``lorakit/__init__.py``, which installs the policy in core's slot
(:mod:`lorakit.core.seam`); variants never name a kernel.
"""

from lorakit.core.seam import install
from lorakit.kernels import cross_entropy, dora, gaps, kronecker, lowrank
from lorakit.kernels.policy import POLICY, enable, enabled, plain
from lorakit.kernels.registry import KERNELS, Kernel, register

install(POLICY)

__all__ = [
    "KERNELS",
    "Kernel",
    "cross_entropy",
    "dora",
    "enable",
    "enabled",
    "gaps",
    "kronecker",
    "lowrank",
    "plain",
    "register",
]

"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base held in 4-bit NormalFloat.

Every linear layer inside the transformer layers keeps its frozen kernel as NF4 codes with one absmax scale per
block of 64 consecutive inputs of an output channel (bitsandbytes' blocks of 64 of the row-major (out, in)
weight; the codebook and the blocking are qwix's `"nf4"`, checked against bitsandbytes' definition in
tests/test_quantize.py). `Linear.base` dequantizes it for each matmul, as bitsandbytes does; the LoRA update
and the trained head stay in float32. Double quantization of the scales and paged optimizers, QLoRA's two
memory devices beside NF4, are not reproduced.

`research export --merged` folds each update into the dequantized weights the adapter was trained against
(`merged_model`), so the merged model computes what the QLoRA model computes, up to float rounding; the
export reports the largest logit difference on the dev split.
"""

from __future__ import annotations

import qwix
from flax import nnx

from research.peft.attach import Frozen
from research.peft.targets import PeftError, block_linears, module_at

BLOCK = 64  # inputs per scale, as bitsandbytes' NF4


def quantize_base(model: nnx.Module) -> list[str]:
    """Turn the frozen kernel of every linear layer inside the transformer layers into NF4 (in place); returns the
    layers' Hugging Face names."""
    layers = block_linears(model, (), "QLoRA")
    for name, path in layers.items():
        layer = module_at(model, path)
        if not isinstance(layer.kernel, Frozen):
            raise PeftError(f"QLoRA: {name}'s kernel is trained, not frozen; NF4 holds frozen weights only")
        kernel = layer.kernel.get_value()  # (in, out)
        if kernel.shape[0] % BLOCK:
            raise PeftError(f"QLoRA: {name} has {kernel.shape[0]} inputs, not a multiple of the NF4 block of {BLOCK}")
        # Per output channel (axis 1), in blocks of 64 inputs (axis 0): bitsandbytes' blocks of the (out, in) weight.
        layer.kernel = Frozen(qwix.quantize(kernel, "nf4", channelwise_axes=(1,), tiled_axes={0: BLOCK}))
    return list(layers)

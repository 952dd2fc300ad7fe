"""Generating with the LoRA adapter merged into the base weights, leaving the trained weights exactly as they were.

An unmerged adapter adds two small matmuls to every adapted layer in every forward; merged (`W + BA`), a forward costs
what the base model's does. PEFT's `unmerge_adapter` subtracts the update again, which in floating point does not give
the base weights back bit for bit; here the merge is done on copies of the adapted layers' base weights, and the
original tensors, never written, are put back on exit. The copies cost the memory of the adapted weights for the
duration of the block.
"""

from __future__ import annotations

from contextlib import contextmanager

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer


def can_merge(model) -> bool:
    """Whether `model` is a PEFT model whose adapted layers all have floating-point base weights that can be copied
    and merged (not quantized ones)."""
    if not isinstance(model, PeftModel):
        return False
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(p.is_floating_point() for m in layers for p in m.get_base_layer().parameters())


@contextmanager
def merged_adapter(model: PeftModel):
    """Inside the block the active adapters are merged into copies of the base weights; on exit the model has its
    original (bit-identical) base weight tensors and the adapters unmerged."""
    originals = [
        (param, param.data)
        for layer in model.modules() if isinstance(layer, BaseTunerLayer)
        for param in layer.get_base_layer().parameters()
    ]
    for param, data in originals:
        param.data = data.clone()
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()  # PEFT's bookkeeping (the layers run the adapter again); the values come next
        for param, data in originals:
            param.data = data

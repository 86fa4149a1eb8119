"""int8 twins of exported towers: ONNX Runtime dynamic quantization of the weight MatMuls, per output channel.

What ``--precision int8`` runs where a version's towers are exported (``vitrina.models.export`` calls this
after the float32 towers pass their check). Chosen by measurement on the demo model (bench/precision.py,
and the trials in ``bench/notes/precision.md``) on the AVX2-only CPUs we serve from:

* dynamic, MatMul only: weights int8 (symmetric), activations uint8 with a range computed per call, so
  no calibration set is needed and any input distribution is covered; attention's score/value products,
  LayerNorm, Softmax, GELU and the patch-embedding Conv stay float32;
* per-channel weight scales: per-tensor scales cost the MiniLM text tower a mean cosine of 0.967 to its
  float32 vectors (the first ONNX int8 attempt, reverted for R@10 0.93x); per channel, 0.994;
* ``reduce_range`` off: 7-bit weights buy nothing per channel (0.993) and lose more per tensor (0.879).

Each int8 tower is checked against the float32 PyTorch tower like its float32 twin, by cosine instead of
max abs difference (int8 moves each vector a little by design); below ``MIN_COSINE`` it is ``rejected``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vitrina.runtime.towers import DATA_SUFFIX

# Worst probe's cosine to the float32 PyTorch vector for an int8 tower to be used: a guard against a broken
# quantization, not the quality bar (bench/precision.py measures that). The probes are the export's odd
# ones (empty, one letter, unicode): on the demo model's MiniLM tower the worst of them, the empty text,
# reaches 0.966, where captions reach >= 0.986.
MIN_COSINE = 0.95


def int8_file(name: str) -> str:
    """``text.onnx`` -> ``text.int8.onnx``: the int8 twin's file name beside the float32 graph."""
    return name.removesuffix(".onnx") + ".int8.onnx"


def quantize_tower(graph: Path, out: Path) -> None:
    """Write the int8 twin of the float32 ``graph`` (weights in ``graph.data``) as ``out`` + ``out.data``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    single = out.with_name(out.name + ".single")  # the quantizer writes one file; split the weights off after
    quiet = logging.getLogger()  # "please run pre-processing" (root logger): the graph was optimised when exported
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(graph),
            str(single),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=False,
            # the exported graph holds ONNX Runtime's fused ops (FusedMatMul, BiasGelu), which shape
            # inference cannot type: their outputs are float32
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(single))
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + DATA_SUFFIX, size_threshold=1024)
    single.unlink()

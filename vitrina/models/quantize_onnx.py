"""int8 twins of exported towers: ONNX Runtime quantization of the weight MatMuls, one method per tower.

What ``--precision int8`` runs where a version's towers are exported (``vitrina.models.export`` calls this
after the float32 towers pass their check). Chosen by measurement on the demo model (bench/precision.py,
and the trials in ``bench/notes/precision.md``):

* the image tower: dynamic, MatMul only: weights int8 (symmetric, one scale per output channel),
  activations uint8 with a range computed per call, so no calibration set is needed; attention's
  score/value products, LayerNorm, Softmax, GELU and the patch-embedding Conv stay float32. Its vectors
  keep a cosine of ~1.000 to float32;
* the text tower: weight-only 8-bit ``MatMulNBits`` (symmetric, a scale per block of 128 weights,
  ``accuracy_level`` 4: int8 arithmetic where the CPU has it). The MiniLM tower's activations have outliers
  that a per-call activation range spreads over the whole 8 bits: dynamic quantization left it a mean cosine
  of 0.984 (min 0.956) to float32 and the demo model 0.98x of its R@10; per-block weights alone keep 0.998
  (min 0.995) and 0.994x, at 188 against 199 single queries/s (AVX-512 VNNI machine, 2026-12-04);
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


TEXT_BLOCK = 128  # weights per scale in the text tower's MatMulNBits
# How each tower's int8 twin is made (recorded in the manifest's int8 entry)
METHODS = {
    "image": "dynamic, MatMul, per channel",
    "text": f"MatMulNBits, 8-bit weights, blocks of {TEXT_BLOCK}, accuracy level 4",
}


def quantize_tower(graph: Path, out: Path, tower: str) -> None:
    """Write the int8 twin of ``tower``'s float32 ``graph`` (weights in ``graph.data``) as ``out`` + ``out.data``."""
    import onnx

    quiet = logging.getLogger()  # "please run pre-processing" (root logger): the graph was optimised when exported
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = _weight_only_8bit(graph) if tower == "text" else _dynamic_per_channel(graph, out)
    finally:
        quiet.setLevel(level)
    onnx.save_model(model, str(out), save_as_external_data=True, location=out.name + DATA_SUFFIX, size_threshold=1024)


def _dynamic_per_channel(graph: Path, out: Path):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    single = out.with_name(out.name + ".single")  # the quantizer writes one file; the weights are split off after
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
        return onnx.load(str(single))
    finally:
        single.unlink(missing_ok=True)


def _weight_only_8bit(graph: Path):
    import onnx

    MatMulNBitsQuantizer = _import_nbits_quantizer()
    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(graph)), bits=8, block_size=TEXT_BLOCK, is_symmetric=True, accuracy_level=4
    )
    quantizer.process()
    return quantizer.model.model


def _import_nbits_quantizer():
    """ONNX Runtime's ``MatMulNBitsQuantizer``, imported without the side effect of its module: it calls
    ``logging.basicConfig(level=INFO)``, which would give the whole process a root handler at INFO (and print a
    line per skipped node). The root logger is put back as it was, and the module's own logger kept quiet."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer

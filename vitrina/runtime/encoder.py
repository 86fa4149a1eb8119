"""``OnnxQueryEncoder``: a version's exported towers behind the ``Encoder`` interface, in ONNX Runtime.

Sessions are created on first use, one per tower: a text query never loads the image tower. Outputs
are numpy arrays; ``vitrina.search`` takes numpy or torch from any encoder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitrina.encoder import as_numpy
from vitrina.runtime.preprocess import ImagePreprocess, unsupported
from vitrina.runtime.tokenizer import QueryTokenizer
from vitrina.runtime.towers import (
    OK,
    TOKENIZER_FILE,
    TOWER_FILES,
    TowersUnavailable,
    is_current,
    read_manifest,
    tower_status,
)

PRECISIONS = ("fp32", "int8")  # what exported towers run at: the float32 graphs, or their int8 twins
TEXT_BATCH = 256  # texts per tower call (zero-shot prompt ensembles can be thousands)


def cpu_threads() -> int:
    """The cores this process may run on (the container's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None = None):
    """ONNX Runtime options for a query process: one op at a time, each on ``threads`` cores (default: all
    this process may use: 2 on the machines we measure on).

    The graphs were optimised when exported, so only the cheap, always-safe basic passes run at load.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3  # errors only: a query prints hits, not runtime chatter
    # Idle pool threads sleep instead of spinning: spinning buys microseconds per call and takes a core
    # from everything else in the process (the search, a server's other requests, PyTorch beside it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxQueryEncoder:
    """Text and image queries -> (B, D) float32 unit vectors from a version's exported towers.

    ``load(folder, digest=...)`` refuses towers of other weights. ``has_text`` / ``has_image`` say which
    towers are usable; ``why_not(tower)`` says why one is not (a rejected export, a model that cannot be
    exported). ``identity`` is the identity of the version the towers were exported from.

    ``fallback``: called (once) when a query needs a tower that is not usable; it returns the version's
    PyTorch encoder, which then answers for that tower (its own transform included), or raises to refuse.
    Without it, such a query raises ``TowersUnavailable``.

    ``precision`` ``int8`` runs each tower's int8 twin (``vitrina.models.quantize_onnx``); a tower without a
    usable one is not usable at int8 (the fallback answers for it).
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: dict,
        *,
        threads: int | None = None,
        fallback: Callable | None = None,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: the exported towers run at {' or '.join(PRECISIONS)}")
        self.folder = Path(folder)
        self.precision = precision
        self.manifest = manifest
        self.embed_dim = int(manifest["embed_dim"])
        self.threads = threads
        self._identity = dict(manifest.get("identity") or {})
        self._sessions: dict[str, object] = {}
        self._tokenizer: QueryTokenizer | None = None
        self._preprocess: ImagePreprocess | None = None
        self._fallback = fallback
        self._fallback_encoder = None

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        digest: str | None,
        threads: int | None = None,
        fallback: Callable | None = None,
        precision: str = "fp32",
    ) -> OnnxQueryEncoder:
        """The towers in ``folder``, exported from the weights ``digest``; ``TowersUnavailable`` otherwise."""
        manifest = read_manifest(folder)
        if manifest is None:
            raise TowersUnavailable(f"{folder}: no exported towers")
        if not is_current(manifest, digest):
            raise TowersUnavailable(f"{folder}: the towers were exported from other weights")
        return cls(folder, manifest, threads=threads, fallback=fallback, precision=precision)

    def _other(self, tower: str):
        """The fallback encoder for an unusable ``tower`` (loaded on first need), or ``TowersUnavailable``."""
        reason = self.why_not(tower)
        if reason is None:
            return None
        if self._fallback is None:
            raise TowersUnavailable(reason)
        if self._fallback_encoder is None:
            self._fallback_encoder = self._fallback()
        return self._fallback_encoder

    def runs(self, tower: str) -> str:
        """``"onnx"`` when ``tower`` runs here, ``"fallback"`` when the fallback encoder would answer for it."""
        return "onnx" if self.why_not(tower) is None else "fallback"

    # --- what is there ---------------------------------------------------------------------------

    @property
    def identity(self) -> dict:
        return dict(self._identity)

    def why_not(self, tower: str) -> str | None:
        """Why ``tower`` ("text" or "image") cannot be used, or None when it can."""
        status, reason = tower_status(self.manifest, tower)
        if status != OK:
            return f"{tower} tower {status}" + (f": {reason}" if reason else "")
        if self.precision == "int8":
            int8 = self.manifest[tower].get("int8") or {
                "status": "not exported",
                "reason": "exported before int8 twins",
            }
            if int8.get("status") != OK:
                return f"{tower} tower's int8 twin {int8.get('status')}" + (
                    f": {int8['reason']}" if int8.get("reason") else ""
                )
        if tower == "image":
            return unsupported(self.manifest["image"].get("preprocess"))
        return None

    @property
    def has_text(self) -> bool:
        return self.why_not("text") is None

    @property
    def has_image(self) -> bool:
        return self.why_not("image") is None

    def _require(self, tower: str) -> None:
        reason = self.why_not(tower)
        if reason is not None:
            raise TowersUnavailable(reason)

    def _session(self, tower: str):
        """The ONNX Runtime session of ``tower``, created on first use."""
        session = self._sessions.get(tower)
        if session is None:
            import onnxruntime as ort

            self._require(tower)
            entry = self.manifest[tower]["int8"] if self.precision == "int8" else self.manifest[tower]
            path = self.folder / entry.get("file", TOWER_FILES[tower])
            session = ort.InferenceSession(str(path), session_options(self.threads), providers=["CPUExecutionProvider"])
            self._sessions[tower] = session
        return session

    # --- text ------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> QueryTokenizer:
        """The text tower's tokenizer (read on first use)."""
        if self._tokenizer is None:
            self._require("text")
            settings = self.manifest["text"].get("tokenizer", {})
            path = self.folder / settings.get("file", TOKENIZER_FILE)
            self._tokenizer = QueryTokenizer.from_file(path, trim_padding=bool(settings.get("trim_padding", True)))
        return self._tokenizer

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """list of B strings -> (B, D) float32 unit vectors."""
        texts = list(texts)
        if not texts:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        other = self._other("text")
        if other is not None:
            return as_numpy(other.encode_text(texts))
        session, tokenizer = self._session("text"), self.tokenizer
        names = [i.name for i in session.get_inputs()]  # a tower that pools by ids alone takes no mask
        out = []
        for i in range(0, len(texts), TEXT_BATCH):
            feeds = tokenizer(texts[i : i + TEXT_BATCH])
            out.append(session.run(None, {name: feeds[name] for name in names})[0])
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    # --- images ----------------------------------------------------------------------------------

    @property
    def image_transform(self) -> Callable:
        """PIL image -> (3, H, W) float32 numpy pixels, as the image tower expects them (the fallback's own
        transform when the image tower is not usable here)."""
        other = self._other("image")
        if other is not None:
            return other.image_transform
        if self._preprocess is None:
            self._preprocess = ImagePreprocess.from_describe(self.manifest["image"]["preprocess"])
        return self._preprocess

    def encode_image(self, pixels) -> np.ndarray:
        """(B, 3, H, W) pixels (numpy, or anything ``np.asarray`` takes) -> (B, D) float32 unit vectors."""
        other = self._other("image")
        if other is not None:
            return as_numpy(other.encode_image(pixels))
        pixels = np.ascontiguousarray(np.asarray(pixels, dtype=np.float32))
        if len(pixels) == 0:
            return np.empty((0, self.embed_dim), dtype=np.float32)
        session = self._session("image")
        return np.ascontiguousarray(session.run(None, {"pixels": pixels})[0], dtype=np.float32)

"""A trained model as a directory: what serving loads, and its one encode() entry point.

Layout: `model.safetensors` (weights, including the item -> attribute table when used),
`config.json` (EncoderConfig), `vocab.json` (item ids in row order), `metadata.json`
(data path, metrics, version, created, train seconds, seed); training adds
`training_curve.png` and `metrics.json`. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from model.data import Interaction, featurize
from model.encoder import EncoderConfig, SequenceEncoder

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
METADATA = "metadata.json"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's cpuset), not the
    machine's count, so that a worker pinned to 2 cores of a 16-core machine sizes its threads
    for 2 (7 torch threads per lane on 2 cores only contend)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):   # no affinity on this OS
        return os.cpu_count() or 1


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products beat float32 here: CUDA, or a CPU with bf16 instructions
    (AVX512-BF16 or AMX-BF16). Elsewhere bf16 is emulated and slower, so training and serving stay
    in float32. oneDNN's own check (`_is_mkldnn_bf16_supported`) says yes on any AVX512 CPU,
    emulation included: one thread's [3200, 256] x [256, 768] product took 46.0 ms in bf16
    against 12.7 in float32 on a Xeon without AVX512-BF16, and 3.0 against 14.5 on an EPYC with
    it (`benchmarks/encoder.py --dtypes` compares the serving encoder both ways)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def keep_attention_precompiled(device: torch.device) -> None:
    """On CUDA, keep scaled_dot_product_attention off cuDNN's backend (for the whole process).
    ``ModelArtifact.load`` calls it: a loaded model serves (the worker, the naive baseline) or is
    evaluated, in batches whose shapes change from one to the next.

    cuDNN's attention compiles a kernel (NVRTC) for each new shape. A sampling profile (py-spy,
    4 s at saturation) of a worker on an H200, pinned to 2 cores, on the scale workload: its two
    recommend threads spent 70% of their samples in nvrtcCompileProgram or waiting on its lock,
    under the attention calls of full and step passes. The flash, memory-efficient and math
    kernels are built ahead of time.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def host_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array (bfloat16, which numpy lacks, as its int16 bits)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def as_float32(values: np.ndarray) -> np.ndarray:
    """``host_view``'s values as float32: bf16 bits (int16) shifted into the high half of a
    float32, exact as torch's conversion; other arrays as they are."""
    if values.dtype != np.int16:
        return values
    return (values.astype(np.int32) << 16).view(np.float32)


def cpu_capabilities() -> dict:
    """torch.cpu.get_capabilities()'s mapping (instruction sets by name), {} where torch has none."""
    try:
        return torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return {}


def cpu_has_native_bf16(capabilities=None) -> bool:
    """AVX512-BF16 or AMX-BF16 on this x86 CPU (``capabilities``: a ``cpu_capabilities`` mapping,
    for tests). Other architectures: False (not measured here, so float32)."""
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def cpu_has_amx_bf16(capabilities=None) -> bool:
    """AMX-BF16 (matrix tiles) on this x86 CPU, where oneDNN's bf16 kernels, torch's fused CPU
    attention among them, run on the tiles (``capabilities`` as for ``cpu_has_native_bf16``)."""
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    return bool(capabilities.get("amx_tile") and capabilities.get("amx_bf16"))


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back.

    A serving pass allocates and frees megabytes of activations. With glibc's defaults the freed
    top of the heap goes back to the kernel (and blocks above an adaptive size are mapped apart),
    so the next pass touches fresh pages that the kernel must fault in and zero. Measured with
    `benchmarks/lanes.py --repeats 1 --batches 4` (2,048 misses of the scale shop, two runs each):
    378-398k page faults and 0.94 s of system time against 659-685k and 1.37-1.55 s with
    `--glibc-defaults`, peak RSS the same (2.1 GB); its wall time moved less than run-to-run
    noise. Blocks up to 32 MiB come from the heap; up to 1 GiB freed stays there.

    Every thread allocates from that one heap (one arena): glibc gives each new thread an
    arena of its own, a chain of 64 MiB heaps that it unmaps as soon as one is empty, so a
    lane's passes kept mapping fresh pages however the thresholds were set. In a virtual
    machine a fresh page can cost far more than its zeroing: in `bench e2e --workload scale
    --rates max,max,max --events 30000` on Kafka the worker spent 17.3% of its CPU time in the
    kernel during the phases (432k page faults) against 6.2% (187k) with one arena. Call it
    before the lanes' threads start. Linux with glibc only (elsewhere False, nothing changed);
    called once by processes that serve.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    return (bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
            and bool(mallopt(m_arena_max, 1)))


def new_version(items: list[str]) -> str:
    """Timestamp plus a short random-ish hash: unique per training run, sortable by time."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    digest = hashlib.sha1(f"{time.time_ns()}:{len(items)}".encode()).hexdigest()[:8]
    return f"{stamp}-{digest}"


class ModelArtifact:
    """An encoder plus its item vocabulary. score(u, i) = encode(u) . item_embeddings()[i]."""

    def __init__(self, encoder: SequenceEncoder, items: list[str], metadata: dict | None = None,
                 device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.encoder = encoder.to(self.device)
        self.config: EncoderConfig = encoder.cfg
        self.items = list(items)
        self.item_index = {item: i for i, item in enumerate(self.items)}  # row in item_embeddings()
        self.token_index = {item: i + 1 for i, item in enumerate(self.items)}  # encoder id; 0 = padding
        assert len(self.items) == self.config.n_items
        self.metadata = dict(metadata or {})
        self.metadata.setdefault("version", new_version(self.items))

    @property
    def version(self) -> str:
        return self.metadata["version"]

    @property
    def dim(self) -> int:
        return self.config.dim

    def item_embeddings(self) -> np.ndarray:
        """float32 [n_items, dim], row i = self.items[i]; scores are inner products with these."""
        with torch.inference_mode():
            vecs = self.encoder.item_vectors()[1:]
        return vecs.detach().float().cpu().numpy().astype(np.float32, copy=True)

    def encode(self, histories: list[list[Interaction]]) -> np.ndarray:
        """float32 [B, dim] user vectors, one forward pass for the batch.

        Unknown item ids are skipped; only the last max_len events count. A history with no
        known item gives a zero row (cold start is the caller's business).
        """
        if not histories:
            return np.zeros((0, self.dim), dtype=np.float32)
        *columns, _ = featurize(histories, self.token_index, self.config.max_len, width=1)
        return self.encode_tensors(*(torch.from_numpy(c).to(self.device) for c in columns)).cpu().numpy()

    def encode_tensors(self, items, types, gaps, batch_size: int = 1024) -> torch.Tensor:
        """Left-padded id tensors -> float32 [B, dim] (the last position), zero if empty."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = torch.zeros(items.shape[0], self.dim, device=items.device)
        with torch.inference_mode():
            # Most histories are short: encode users in order of length, each chunk trimmed to
            # its longest history, instead of padding everyone to max_len.
            lengths = (items > 0).sum(1)
            order = torch.argsort(lengths)
            for s in range(0, items.shape[0], batch_size):
                rows = order[s:s + batch_size]
                width = int(lengths[rows].max())
                if width == 0:
                    continue  # no known item: zero rows
                it, ty, ga = (a[rows, -width:] for a in (items, types, gaps))
                h = self.encoder(it, ty, ga, last_only=True)[:, -1].float()
                out[rows] = h * (it[:, -1:] > 0)
        self.encoder.train(was_training)
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        save_file(state, str(directory / WEIGHTS))
        config = dataclasses.asdict(self.config)
        if config["positions"] == "learned":  # the format that versions before rotary positions read
            del config["positions"], config["rope_base"]
        if not config["conv_kernel"]:   # ... and before the input convolution
            del config["conv_kernel"]
        _write_json(directory / CONFIG, config)
        _write_json(directory / VOCAB, self.items)
        _write_json(directory / METADATA, self.metadata)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str | None = None) -> ModelArtifact:
        directory = Path(directory)
        raw = json.loads((directory / CONFIG).read_text())
        raw.setdefault("positions", "learned")  # written before rotary positions existed
        raw.setdefault("conv_kernel", 0)        # written before the input convolution existed
        cfg = EncoderConfig(**raw)
        items = json.loads((directory / VOCAB).read_text())
        metadata = json.loads((directory / METADATA).read_text())
        encoder = SequenceEncoder(cfg)
        encoder.load_state_dict(load_file(str(directory / WEIGHTS)))
        encoder.eval()
        artifact = cls(encoder, items, metadata, device=device)
        keep_attention_precompiled(artifact.device)
        return artifact


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)

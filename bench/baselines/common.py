"""Shared helpers for the PyTorch baselines: arguments, timing, OOM handling, JSON output, the
Qwen2.5-1.5B-shaped teacher, FLOP counts (from /work/shared/docs/performance.md) and tables.

Nothing here imports transformers at module import time: the teacher is built lazily, so the student
and loss parts can be smoke-tested on a machine with torch only.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time

import torch

# ---------------------------------------------------------------------------------------------------
# Teacher shapes (Qwen2.5-1.5B) and FLOP counts
# ---------------------------------------------------------------------------------------------------

QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    head_dim=128,
    tie_word_embeddings=True,
    rope_theta=1.0e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)

# A tiny teacher of the same family for --quick runs.
QWEN_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
    rope_theta=1.0e6,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)


def teacher_fwd_flops_per_token(shape: dict, T: int) -> float:
    """Forward FLOPs per token (multiply-add = 2): all GEMMs incl. the LM head, plus causal attention
    with T/2 keys per query on average. Reproduces performance.md: 3.131 G at T 512, 3.263 G at 2048."""
    d, f, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hq = shape["num_attention_heads"] * shape["head_dim"]
    hkv = shape["num_key_value_heads"] * shape["head_dim"]
    per_layer = d * hq + 2 * d * hkv + hq * d + 3 * d * f
    gemm = 2.0 * (L * per_layer + shape["vocab_size"] * d)
    attn = L * 2.0 * 2.0 * (T / 2.0) * hq          # QK^T and PV, T/2 keys on average
    return gemm + attn


def step_flops_per_token(teacher_shape: dict, T: int, trainable_params: int, vocab: int, d: int,
                         mlstm_cells: float = 0.013e9) -> float:
    """performance.md's useful FLOPs of one distillation step per token: teacher forward
    + 6 x trainable (forward + both backward GEMMs) + frozen head forward and input gradient (4 V d)
    + mLSTM cells (0.013 G at paper scale; pass 0 for toy shapes)."""
    return (teacher_fwd_flops_per_token(teacher_shape, T) + 6.0 * trainable_params
            + 4.0 * vocab * d + mlstm_cells)


# ---------------------------------------------------------------------------------------------------
# Environment, arguments, output
# ---------------------------------------------------------------------------------------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=None, help="write one JSON object here (rewritten after every row)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, smoke test only")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget for the whole script; remaining configs are skipped")
    return ap


def pick_device(args) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": getattr(torch.version, "cuda", None),
        "device": str(device),
    }
    try:
        import transformers  # noqa: F401
        info["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        info["transformers"] = None
        info["transformers_import_error"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["device_name"] = p.name
        info["device_memory_gib"] = round(p.total_memory / 2**30, 2)
        info["sm_count"] = p.multi_processor_count
    else:
        info["device_name"] = platform.processor() or "cpu"
        info["cpu_threads"] = torch.get_num_threads()
    return info


class Results:
    """One JSON object per script; rewritten after every row so a killed run still leaves data."""

    def __init__(self, script: str, args, device: torch.device, extra: dict = None):
        self.path = args.out
        self.obj = {"script": script, "quick": bool(args.quick), **env_info(device),
                    "argv": sys.argv[1:], "notes": [], "rows": []}
        if extra:
            self.obj.update(extra)
        self.t0 = time.time()
        self.budget = args.budget_s
        self.flush()

    def note(self, text: str):
        print("note:", text, flush=True)
        self.obj["notes"].append(text)
        self.flush()

    def add(self, row: dict):
        self.obj["rows"].append(row)
        self.flush()

    def set(self, key, value):
        self.obj[key] = value
        self.flush()

    def time_left(self) -> float:
        if self.budget is None:
            return math.inf
        return self.budget - (time.time() - self.t0)

    def flush(self):
        self.obj["elapsed_s"] = round(time.time() - self.t0, 2) if hasattr(self, "t0") else 0.0
        if not self.path:
            return
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.obj, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------

class PhaseTimer:
    """Marks phase boundaries with CUDA events (no synchronisation inside the step); on the CPU,
    with perf_counter. `mark(name)` closes the phase that started at the previous mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def start(self):
        self.marks = [("start", self._now())]

    def mark(self, name: str):
        self.marks.append((name, self._now()))

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def result_ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks[:-1], self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device):
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return None


def allocated_gib(device: torch.device):
    if device.type == "cuda":
        return round(torch.cuda.memory_allocated(device) / 2**30, 3)
    return None


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_gemm_tflops(device: torch.device, n: int = 8192, iters: int = 20):
    """bf16 n x n x n torch.matmul rate (the GEMM ceiling to quote MFU against); None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        a @ b
    e.record()
    torch.cuda.synchronize(device)
    ms = s.elapsed_time(e) / iters
    del a, b
    torch.cuda.empty_cache()
    return round(2.0 * n ** 3 / (ms / 1e3) / 1e12, 1)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return float("nan")
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---------------------------------------------------------------------------------------------------
# The Hugging Face teacher (lazy import)
# ---------------------------------------------------------------------------------------------------

def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def make_qwen2_config(shape: dict):
    """Qwen2Config with the given shapes. transformers 5 keeps RoPE settings in `rope_parameters`,
    4.x in `rope_theta`; both are handled."""
    import transformers
    from transformers import Qwen2Config
    kw = dict(shape)
    theta = kw.pop("rope_theta")
    head_dim = kw.pop("head_dim")
    assert head_dim * kw["num_attention_heads"] == kw["hidden_size"], "Qwen2 derives head_dim"
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        kw["rope_theta"] = theta
    kw["use_sliding_window"] = False
    cfg = Qwen2Config(**kw)
    return cfg


def build_teacher(shape: dict, device: torch.device, dtype=torch.bfloat16, attn: str = "sdpa"):
    """Qwen2ForCausalLM from a config, random init, on `device`, in `dtype`, eval mode, no grads."""
    from transformers import AutoModelForCausalLM
    cfg = make_qwen2_config(shape)
    model = None
    errors = []
    import contextlib
    where = torch.device(device) if hasattr(torch.device, "__enter__") else contextlib.nullcontext()
    with where:                                   # initialise directly on the GPU (torch >= 2)
        for kw in ({"dtype": dtype, "attn_implementation": attn},
                   {"torch_dtype": dtype, "attn_implementation": attn}):
            try:
                model = AutoModelForCausalLM.from_config(cfg, **kw)
                break
            except TypeError as e:
                errors.append(str(e))
        if model is None:
            raise RuntimeError("could not build the teacher: " + " | ".join(errors))
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def teacher_description(model) -> dict:
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    return {
        "class": type(model).__name__,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
        "tied": bool(cfg.tie_word_embeddings), "rope": rope, "rms_eps": cfg.rms_norm_eps,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "weights": "random init (no checkpoint on the GPU machine)",
    }


# ---------------------------------------------------------------------------------------------------
# Table printing
# ---------------------------------------------------------------------------------------------------

def print_table(rows, cols, title=None):
    """cols: list of (header, key, format). Missing keys print as '-'."""
    if title:
        print("\n" + title)
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        line = []
        for _, k, fmt in cols:
            v = r.get(k)
            if v is None:
                line.append("-")
            elif isinstance(v, str) or fmt is None:
                line.append(str(v))
            else:
                try:
                    line.append(format(v, fmt))
                except (TypeError, ValueError):
                    line.append(str(v))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    for j, line in enumerate(cells):
        print("  ".join(s.rjust(w) for s, w in zip(line, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()

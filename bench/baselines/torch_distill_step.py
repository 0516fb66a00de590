#!/usr/bin/env python3
"""Baseline (b): one Distil-xLSTM distillation step written the way a PyTorch user would.

    HF Qwen2 teacher forward (no grad, logits + hidden states)
      -> PyTorch student (torch_student.py, paper config) forward
      -> loss  w_kl * tau^2 * KL(p_t^tau || p_s^tau) + w_al * ratio alignment + w_ce * CE
      -> backward -> torch.optim.AdamW(fused=True)
    under bf16 autocast, eager and with torch.compile (student and loss compiled; the teacher stays
    eager). Phases are timed with CUDA events. On OOM the batch is halved until the step fits.

The loss is the plain PyTorch one (log_softmax / softmax / kl_div / cross_entropy on the full
[B*T, V] logits in float32), which is what a user writes without a fused kernel. The sLSTM cell is a
Python loop over time (see torch_student.py); under torch.compile the loop stays in Python
(dynamo is kept out of it) and the per-step cell function is compiled on its own, because unrolling
512-2048 steps into one graph is not practical.

    python3 bench/baselines/torch_distill_step.py --out step.json
    python3 bench/baselines/torch_distill_step.py --quick           # smoke test
"""

import math
import os
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as cm          # noqa: E402
import torch_student as ts   # noqa: E402

TAU, W_KL, W_AL, W_CE = 2.0, 0.2, 0.01, 0.8


# ---------------------------------------------------------------------------------------------------
# loss (spec-distillation.md §1, §3 "ratio")
# ---------------------------------------------------------------------------------------------------

def ratio_alignment(hs, ht):
    """Teacher layers split into len(hs) contiguous groups of floor(L_t/L_s) (last takes the rest);
    Frobenius norm of (group mean - student block output) per block, mean over blocks, / sqrt(N)."""
    Ls, Lt = len(hs), len(ht)
    if Lt < Ls:
        raise ValueError(f"ratio alignment needs at least as many teacher layers ({Lt}) as student blocks ({Ls})")
    g = Lt // Ls
    norms = []
    for i, h in enumerate(hs):
        grp = ht[i * g:(i + 1) * g] if i < Ls - 1 else ht[i * g:]
        tmean = torch.stack(grp, 0).float().mean(0)
        norms.append(torch.linalg.vector_norm(h.float() - tmean))
    n_elem = Ls * hs[0].numel()
    return torch.stack(norms).mean() / math.sqrt(n_elem)


def distill_loss(zs, zt, labels, hs, ht, tau: float = TAU, w_kl: float = W_KL, w_al: float = W_AL,
                 w_ce: float = W_CE):
    V = zs.shape[-1]
    s = zs.reshape(-1, V).float()
    t = zt.reshape(-1, V).float()
    kl = F.kl_div(F.log_softmax(s / tau, dim=-1), F.softmax(t / tau, dim=-1),
                  reduction="batchmean") * (tau * tau)
    ce = F.cross_entropy(zs[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))
    al = ratio_alignment(hs, ht)
    total = w_kl * kl + w_al * al + w_ce * ce
    return total, kl.detach(), al.detach(), ce.detach()


# ---------------------------------------------------------------------------------------------------
# stand-in teacher (CPU smoke test only, when transformers is not installed)
# ---------------------------------------------------------------------------------------------------

class _Out:
    def __init__(self, logits, hidden_states):
        self.logits, self.hidden_states = logits, hidden_states


class StandInTeacher(nn.Module):
    """Embedding + L tanh-MLP layers + tied head; returns .logits and .hidden_states (L+1 entries)
    like a HF CausalLM. Used only by --quick when transformers is missing."""

    def __init__(self, V, d, L):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(L)])

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, output_hidden_states=True, **_):
        x = self.emb(input_ids)
        hs = [x]
        for lin in self.layers:
            x = x + torch.tanh(lin(x))
            hs.append(x)
        return _Out(x @ self.emb.weight.t(), tuple(hs))


# ---------------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, teacher, student, opt, device, use_amp, student_fn, loss_fn):
        self.teacher, self.student, self.opt = teacher, student, opt
        self.device, self.use_amp = device, use_amp
        self.student_fn, self.loss_fn = student_fn, loss_fn
        self.timer = cm.PhaseTimer(device)

    def autocast(self):
        if self.use_amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    def step(self, idx):
        tm = self.timer
        tm.start()
        with torch.no_grad():
            out = self.teacher(input_ids=idx, output_hidden_states=True)
            zt = out.logits
            ht = list(out.hidden_states[1:])          # drop the embedding output
            del out
        tm.mark("teacher_fwd")
        with self.autocast():
            zs, hs = self.student_fn(idx)
            tm.mark("student_fwd")
            loss, kl, al, ce = self.loss_fn(zs, zt, idx, hs, ht)
            tm.mark("loss")
        del zs, hs, zt, ht
        loss.backward()
        tm.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        tm.mark("optimizer")
        ms = tm.result_ms()                          # synchronises
        return ms, {"loss": float(loss.detach()), "kl": float(kl), "align": float(al), "ce": float(ce)}


def run_config(runner, mode, B, T, V, args, res, flops_per_token, phase_names):
    """Warm-up then timed steps at (B, T); returns a row (raises on OOM)."""
    dev = runner.device
    gen = torch.Generator(device="cpu").manual_seed(1234)
    idx = torch.randint(0, V, (B, T), generator=gen).to(dev)
    cm.reset_peak(dev)
    t0 = time.perf_counter()
    warm_ms = []
    for _ in range(args.warmup):
        w0 = time.perf_counter()
        runner.step(idx)
        cm.sync(dev)
        warm_ms.append((time.perf_counter() - w0) * 1e3)
    warm_peak = cm.peak_gib(dev)
    cm.reset_peak(dev)
    per_phase = {k: [] for k in phase_names}
    walls, losses = [], None
    t_timed = time.perf_counter()
    for it in range(args.iters):
        w0 = time.perf_counter()
        ms, losses = runner.step(idx)
        walls.append((time.perf_counter() - w0) * 1e3)
        for k in phase_names:
            per_phase[k].append(ms[k])
        if it + 1 >= args.min_iters and time.perf_counter() - t_timed > args.max_timed_s:
            break
    phases = {k: cm.median(v) for k, v in per_phase.items()}
    step_ms = sum(phases.values())
    row = {
        "mode": mode, "batch": B, "seq_len": T, "tokens_per_step": B * T,
        "warmup_steps": args.warmup, "timed_steps": len(walls),
        "step_ms": round(step_ms, 2),
        "step_wall_ms_median": round(cm.median(walls), 2),
        "tokens_per_s": round(B * T / (step_ms / 1e3), 1),
        "tflops_per_s": round(flops_per_token * B * T / (step_ms / 1e3) / 1e12, 2),
        "flops_per_token_G": round(flops_per_token / 1e9, 3),
        **{f"{k}_ms": round(v, 2) for k, v in phases.items()},
        "first_step_wall_ms": round(warm_ms[0], 1) if warm_ms else None,
        "peak_mem_gib": cm.peak_gib(dev),
        "peak_mem_warmup_gib": warm_peak,
        "loss": losses,
        "total_wall_s": round(time.perf_counter() - t0, 1),
    }
    if mode != "eager" and warm_ms:
        row["compile_s_est"] = round((warm_ms[0] - cm.median(walls)) / 1e3, 1)
        row["dynamo_counters"] = dynamo_counters()
    return row


def dynamo_counters():
    """Graph / graph-break statistics of torch._dynamo so far (to show what was really compiled)."""
    try:
        from torch._dynamo.utils import counters
        out = {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "recompiles")}
        gb = counters.get("graph_break", {})
        out["graph_breaks"] = {str(k)[:160]: v for k, v in list(gb.items())[:8]}
        return out
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)}


def main(argv=None) -> int:
    ap = cm.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    ap.add_argument("--shapes", default=None, help="comma list BxT (default 16x512,4x2048)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3, help="timed steps (at most)")
    ap.add_argument("--min-iters", type=int, default=2)
    ap.add_argument("--max-timed-s", type=float, default=40.0,
                    help="stop timing a config after this many seconds once --min-iters are done")
    ap.add_argument("--mlstm", default="auto", choices=["auto", "parallel", "chunkwise"],
                    help="mLSTM form; auto = parallel for T <= 512, chunkwise (64) above")
    ap.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    args = ap.parse_args(argv)

    dev = cm.pick_device(args)
    use_amp = dev.type == "cuda" and not args.no_amp
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res = cm.Results("torch_distill_step", args, dev)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(2, 64), (1, 128)] if args.quick else [(16, 512), (4, 2048)]

    # --- teacher ---
    tshape = cm.QWEN_TINY if args.quick else cm.QWEN25_15B
    if cm.have_transformers():
        teacher = cm.build_teacher(tshape, dev)
        res.set("teacher", cm.teacher_description(teacher))
    else:
        if not args.quick:
            res.note("transformers is not installed: the full-size step needs the HF teacher")
            return 2
        teacher = StandInTeacher(tshape["vocab_size"], tshape["hidden_size"],
                                 tshape["num_hidden_layers"]).to(dev).eval().requires_grad_(False)
        res.set("teacher", {"class": "StandInTeacher (transformers not installed; smoke test only)"})
    V, d = tshape["vocab_size"], tshape["hidden_size"]

    # --- student ---
    if args.quick:
        scfg = ts.StudentConfig(vocab_size=V, d=d, num_blocks=6, slstm_at=[0, 2, 4], mlstm_heads=4,
                                slstm_heads=4, qkv_blocksize=8, chunk=32)
    else:
        scfg = ts.StudentConfig(vocab_size=V, d=d)
    student = ts.Student(scfg).to(dev)
    emb = teacher.get_input_embeddings().weight
    head = teacher.get_output_embeddings().weight if hasattr(teacher, "get_output_embeddings") \
        and teacher.get_output_embeddings() is not None else emb
    student.load_frozen_from_teacher(emb.float(), head.float())
    n_train, n_total = ts.count_params(student)
    params = student.trainable_parameters()
    opt_desc = "torch.optim.AdamW(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)"
    try:
        opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=dev.type == "cuda")
    except (TypeError, RuntimeError) as e:
        opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.1)
        opt_desc = f"torch.optim.AdamW (fused unavailable: {e})"
    res.set("student", {
        "config": {k: getattr(scfg, k) for k in ("vocab_size", "d", "num_blocks", "slstm_at",
                                                 "mlstm_heads", "slstm_heads", "qkv_blocksize",
                                                 "conv_kernel", "mlstm_proj_factor", "ffn_proj_factor")},
        "trainable_params": n_train, "total_params": n_total,
        "param_dtype": "float32", "embedding_and_head": "frozen, untied, copied from the teacher",
        "slstm": "Python loop over time steps (no custom kernel)",
        "mlstm": ("parallel form for T <= 512, chunkwise (chunk 64) above" if args.mlstm == "auto"
                  else args.mlstm),
    })
    res.set("loss", {"tau": TAU, "w_kl": W_KL, "w_al": W_AL, "w_ce": W_CE, "alignment": "ratio",
                     "implementation": "plain PyTorch over full [B*T, V] float32 logits"})
    res.set("optimizer", opt_desc)
    res.set("precision", "bf16 autocast, fp32 master weights" if use_amp else "float32")
    phase_names = ["teacher_fwd", "student_fwd", "loss", "backward", "optimizer"]
    print(f"device {res.obj['device_name']}, torch {torch.__version__}, transformers "
          f"{res.obj.get('transformers')}; student {n_train:,} trainable / {n_total:,} total", flush=True)

    rows = []
    for mode in modes:
        student_fn, loss_fn = student, distill_loss
        if mode == "compile":
            if not hasattr(torch, "compile"):
                res.add({"mode": mode, "error": f"torch {torch.__version__} has no torch.compile"})
                continue
            try:
                ts.disable_dynamo_on_slstm_loop()
                ts.compile_slstm_step(dynamic=False)
                student_fn = torch.compile(student)
                loss_fn = torch.compile(distill_loss)
            except Exception as e:  # noqa: BLE001
                res.add({"mode": mode, "error": f"torch.compile set-up failed: {type(e).__name__}: {e}"})
                continue
            res.note("compile mode: torch.compile(student) and torch.compile(loss); the sLSTM time loop "
                     "is excluded from dynamo (torch.compiler.disable) and its per-step function is "
                     "torch.compile'd separately (dynamic=False); teacher eager")
        elif mode != "eager":
            res.note(f"unknown mode {mode!r} skipped")
            continue
        for (B0, T) in shapes:
            form = args.mlstm if args.mlstm != "auto" else ("parallel" if T <= 512 else "chunkwise")
            for blk in student.blocks:
                if not blk.is_slstm:
                    blk.xlstm.form = form
            if res.time_left() < 30:
                res.add({"mode": mode, "batch": B0, "seq_len": T, "skipped": "time budget exhausted"})
                continue
            B = B0
            oom_at = []
            row = None
            while B >= 1:
                runner = Runner(teacher, student, opt, dev, use_amp, student_fn, loss_fn)
                err = None
                try:
                    flops = cm.step_flops_per_token(tshape, T, n_train, V, d,
                                                    0.0 if args.quick else 0.013e9)
                    row = run_config(runner, mode, B, T, V, args, res, flops, phase_names)
                except Exception as e:  # noqa: BLE001
                    err = e
                    oom = cm.is_oom(e)
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                    tb = traceback.format_exc()[-3000:]
                del runner
                opt.zero_grad(set_to_none=True)
                if err is None:
                    break
                err = None
                cm.free_memory(dev)
                if oom:
                    oom_at.append(B)
                    print(f"  {mode} B{B}xT{T}: out of memory, halving the batch", flush=True)
                    B //= 2
                    continue
                row = {"mode": mode, "batch": B, "seq_len": T, "error": msg, "traceback": tb}
                print(f"  {mode} B{B}xT{T}: FAILED {msg}\n{tb}", flush=True)
                break
            if row is None:
                row = {"mode": mode, "batch": 0, "seq_len": T, "error": "out of memory even at batch 1"}
            row["requested_batch"] = B0
            row["mlstm_form"] = form
            if oom_at:
                row["oom_at_batch"] = oom_at
            res.add(row)
            rows.append(row)
            cm.print_table([row], _COLS)
            cm.free_memory(dev)

    cm.print_table(rows, _COLS, title="PyTorch distillation step (sLSTM = Python loop over time)")
    return 0


_COLS = [("mode", "mode", None), ("B", "batch", "d"), ("T", "seq_len", "d"), ("req B", "requested_batch", "d"),
         ("tok/s", "tokens_per_s", ",.0f"), ("step ms", "step_ms", ".1f"), ("teacher", "teacher_fwd_ms", ".1f"),
         ("stud fwd", "student_fwd_ms", ".1f"), ("loss", "loss_ms", ".1f"), ("bwd", "backward_ms", ".1f"),
         ("opt", "optimizer_ms", ".1f"), ("TFLOP/s", "tflops_per_s", ".1f"), ("peak GiB", "peak_mem_gib", ".1f"),
         ("compile s", "compile_s_est", ".0f"), ("error", "error", None)]


if __name__ == "__main__":
    sys.exit(main())

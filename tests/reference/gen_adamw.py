#!/usr/bin/python3
"""PyTorch reference for distilx's optimizer stack (include/distilx/optim): a few steps of
torch.optim.AdamW (float64, two parameter groups: weight decay / none) driven by a LambdaLR
with Hugging Face's cosine-with-warm-up (and min-lr) lambda, with
torch.nn.utils.clip_grad_norm_ applied to the given random gradients before every step.

Writes DIR/adamw_ref.safetensors, read by the `optim` suite of tests/unit/test_optim.cpp:
  init/<name>                 initial parameters
  grad/<k>/<name>             raw gradient of step k (before clipping)
  param/<k>/<name>            parameters after step k
  exp_avg/<name>, exp_avg_sq/<name>   AdamW state after the last step
  lr (steps,)                 lr used by step k;  grad_norm (steps,)  pre-clip norm of step k
  __metadata__.config         JSON: hyperparameters, schedule, max_norm, steps, params [{name, shape, decay}]

Usage: /usr/bin/python3 tests/reference/gen_adamw.py --out DIR   (Debian python3-torch 1.13 works)
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from xlstm_ref import read_safetensors, write_safetensors  # noqa: E402

# Names follow the student's state_dict so ParamLayout's decay rule applies unchanged; sizes are
# not multiples of 16, so the C++ flat buffer has padding between them.
PARAMS = [
    ("xlstm_block_stack.blocks.0.ffn.proj_up.weight", (5, 3)),                  # decay
    ("xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_", (2, 3, 4)),  # no decay
    ("xlstm_block_stack.blocks.1.ffn_norm.weight", (7,)),                       # no decay (norm)
]
LR, BETAS, EPS, WEIGHT_DECAY = 0.05, (0.9, 0.95), 1e-8, 0.1
WARMUP, TOTAL, MIN_LR_RATIO = 2, 7, 0.1
MAX_NORM = 1.0
GRAD_SCALES = [0.03, 2.0, 0.05, 0.8, 0.02, 1.5]  # norms ~0.2, 13, 0.3, 5, 0.1, 10: clipping on steps 1, 3, 5
STEPS = len(GRAD_SCALES)


def decays(name: str) -> bool:
    """NX-AI / distilx grouping: weight decay iff 'weight' in the name and no 'norm'."""
    return "weight" in name and "norm" not in name


def cosine_with_min_lr_lambda(step: int) -> float:
    """transformers' _get_cosine_with_min_lr_schedule_with_warmup_lr_lambda (num_cycles 0.5)."""
    if step < WARMUP:
        return float(step) / float(max(1, WARMUP))
    progress = float(step - WARMUP) / float(max(1, TOTAL - WARMUP))
    factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
    factor = factor * (1 - MIN_LR_RATIO) + MIN_LR_RATIO
    return max(0, factor)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(20240607)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)) for _, shape in PARAMS]
    names = [n for n, _ in PARAMS]
    out = {f"init/{n}": p.detach().clone() for n, p in zip(names, params)}

    groups = [
        {"params": [p for n, p in zip(names, params) if decays(n)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in zip(names, params) if not decays(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, amsgrad=False, maximize=False, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_min_lr_lambda)

    lrs, norms = [], []
    for k in range(STEPS):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * GRAD_SCALES[k] for p in params]
        for n, p, g in zip(names, params, grads):
            out[f"grad/{k}/{n}"] = g.clone()
            p.grad = g
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        for n, p in zip(names, params):
            out[f"param/{k}/{n}"] = p.detach().clone()
    for n, p in zip(names, params):
        out[f"exp_avg/{n}"] = opt.state[p]["exp_avg"].clone()
        out[f"exp_avg_sq/{n}"] = opt.state[p]["exp_avg_sq"].clone()
    out["lr"] = torch.tensor(lrs, dtype=torch.float64)
    out["grad_norm"] = torch.tensor(norms, dtype=torch.float64)

    clipped = [nrm > MAX_NORM for nrm in norms]
    if not any(clipped) or all(clipped) or lrs[0] != 0.0:
        print(f"gen_adamw: fixture does not exercise what it should (norms {norms}, lrs {lrs})", file=sys.stderr)
        return 1

    config = {
        "lr": LR, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "weight_decay": WEIGHT_DECAY,
        "warmup_steps": WARMUP, "total_steps": TOTAL, "min_lr_ratio": MIN_LR_RATIO, "max_norm": MAX_NORM,
        "steps": STEPS, "params": [{"name": n, "shape": list(s), "decay": decays(n)} for n, s in PARAMS],
        "torch": torch.__version__,
    }
    path = os.path.join(args.out, "adamw_ref.safetensors")
    write_safetensors(path, out, {"config": json.dumps(config)})

    back, meta = read_safetensors(path)  # round-trip check of the hand-written file
    ok = json.loads(meta["config"]) == config and all(torch.equal(back[k], v) for k, v in out.items())
    print(f"gen_adamw: wrote {path} ({len(out)} tensors, {STEPS} steps, clipped on steps "
          f"{[k for k, c in enumerate(clipped) if c]}){'' if ok else ' — ROUND-TRIP MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Trains the small teacher that ships with distilx's embedded demo (runs on the GPU machine).

Input: the King James Bible as printed by Debian's `bible-kjv` package
(`bible -f "Gen1:1-Rev22:21" > kjv_raw.txt`, one verse per line, "Ge1:1 In the beginning...").
The text is public domain; the Debian package's data is free to copy, modify and distribute.

Output (--out DIR):
  teacher/config.json, teacher/model.safetensors, teacher/tokenizer.json  (Hugging Face format, Qwen2 architecture)
  data/train.txt    chapters the demo distils on (a subset of the teacher's training chapters), one per paragraph
  data/heldout.txt  every 20th chapter: never seen by the teacher's training, the demo's validation split
  train_log.txt     the teacher's loss curve and held-out perplexity

Needs torch, transformers (Qwen2) and tokenizers. Deterministic given --seed (up to GPU nondeterminism).
"""
import argparse
import json
import math
import os
import re
import time


def chapters(raw_path):
    """Groups verse lines into chapters: list of (book, chapter, text)."""
    pat = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
    out, key, verses = [], None, []
    with open(raw_path, encoding="utf-8") as f:
        for line in f:
            m = pat.match(line.rstrip("\n"))
            if not m:
                continue
            k = (m.group(1), int(m.group(2)))
            if k != key and verses:
                out.append((key[0], key[1], " ".join(verses)))
                verses = []
            key = k
            verses.append(m.group(4).strip())
    if verses:
        out.append((key[0], key[1], " ".join(verses)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=800)  # more overfits 1M tokens (3000: held-out ppl 82)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--demo-train-every", type=int, default=4, help="ship every k-th training chapter")
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(os.path.join(args.out, "teacher"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    log = open(os.path.join(args.out, "train_log.txt"), "w")

    def say(*a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        log.write(s + "\n")
        log.flush()

    ch = chapters(args.raw)
    held = [c for i, c in enumerate(ch) if i % 20 == 19]
    train = [c for i, c in enumerate(ch) if i % 20 != 19]
    say(f"{len(ch)} chapters: {len(train)} train, {len(held)} held out")
    with open(os.path.join(args.out, "data", "train.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(c[2] for i, c in enumerate(train) if i % args.demo_train_every == 0) + "\n")
    with open(os.path.join(args.out, "data", "heldout.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(c[2] for c in held) + "\n")

    # Byte-level BPE tokenizer (GPT-2 / Qwen2 style) with an end-of-text token.
    eot = "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=[eot], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((c[2] for c in train), trainer=trainer)
    tok.save(os.path.join(args.out, "teacher", "tokenizer.json"))
    eot_id = tok.token_to_id(eot)
    V = tok.get_vocab_size()
    say(f"tokenizer: vocab {V}, {eot} = {eot_id}")

    def encode(docs):
        ids = []
        for c in docs:
            ids.extend(tok.encode(c[2]).ids)
            ids.append(eot_id)
        return torch.tensor(ids, dtype=torch.long)

    tr_ids, he_ids = encode(train), encode(held)
    say(f"tokens: {tr_ids.numel()} train, {he_ids.numel()} held out")

    cfg = Qwen2Config(vocab_size=V, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=1024, rope_theta=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id,
                      use_sliding_window=False)
    model = Qwen2ForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"teacher: Qwen2, {n_params} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, args.steps - warm))))
    tr_ids = tr_ids.to(dev)
    he_ids = he_ids.to(dev)
    g = torch.Generator(device="cpu").manual_seed(args.seed)

    def heldout_ppl():
        model.eval()
        n = (he_ids.numel() - 1) // args.seq
        tot, cnt = 0.0, 0
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            for i in range(0, n, args.batch):
                rows = torch.stack([he_ids[j * args.seq:(j + 1) * args.seq + 1] for j in range(i, min(n, i + args.batch))])
                out = model(rows[:, :-1]).logits.float()
                loss = torch.nn.functional.cross_entropy(out.reshape(-1, V), rows[:, 1:].reshape(-1), reduction="sum")
                tot += loss.item()
                cnt += rows[:, 1:].numel()
        model.train()
        return math.exp(tot / cnt)

    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, tr_ids.numel() - args.seq - 1, (args.batch,), generator=g).to(dev)
        idx = starts[:, None] + torch.arange(args.seq + 1, device=dev)[None, :]
        rows = tr_ids[idx]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(rows[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), rows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            say(f"step {step:5d} loss {loss.item():.4f} held-out ppl {heldout_ppl():.2f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s")
    ppl = heldout_ppl()
    say(f"held-out perplexity {ppl:.3f} after {args.steps} steps, {time.time() - t0:.0f}s")
    model = model.to("cpu").to(torch.bfloat16)
    model.save_pretrained(os.path.join(args.out, "teacher"), safe_serialization=True)
    p = os.path.join(args.out, "teacher", "generation_config.json")
    if os.path.exists(p):
        os.remove(p)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"heldout_ppl_bf16_autocast": ppl, "params": n_params, "vocab": V,
                   "train_tokens": int(tr_ids.numel()), "heldout_tokens": int(he_ids.numel()), "steps": args.steps}, f)


if __name__ == "__main__":
    main()

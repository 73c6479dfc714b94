#!/usr/bin/env python3
"""The Hugging Face peer of `bench-train` (DESIGN.md §6: recforge's LoRA training should reach
>= 2x HF PEFT + bitsandbytes 8-bit on the same GPU).

Trains PEFT LoRA adapters on a randomly initialised LLaMA (LLaMA-7B shapes by default: hidden
4096, 32 layers, 32 heads, intermediate 11008, vocabulary 32000) with the same batch, sequence,
accumulation and LoRA settings as bench-train, gradient checkpointing on, AdamW, and reports the
median tokens/s over the measured steps and the peak memory (torch.cuda.max_memory_allocated).

Modes (--modes, default "bf16,int8"):
  bf16  the base in bf16 (frozen), LoRA adapters in f32 (PEFT's autocast_adapter_dtype), the
        forward under torch.autocast(bf16);
  bf16-nockpt  the same without gradient checkpointing whatever --no-checkpointing says: the
        peer at its fastest where its activations fit the GPU (an "oom" result where not);
  int8  the base's q,k,v,o,gate,up,down as bitsandbytes Linear8bitLt (LLM.int8, threshold 6.0,
        has_fp16_weights=False: exactly the modules BitsAndBytesConfig(load_in_8bit=True)
        gives), prepared with PEFT's prepare_model_for_kbit_training, autocast(bf16). Runs only
        when `import bitsandbytes` works (the GPU machine's image lacks it: gpu-check.sh stages
        a pinned copy and puts it on PYTHONPATH); "int8_linears" in the JSON counts the
        Linear8bitLt modules holding int8 weights. --int8-via swap (default) quantizes the random bf16
        model's linears in place; --int8-via checkpoint saves the random model to a temporary
        folder and loads it back with from_pretrained(quantization_config=
        BitsAndBytesConfig(load_in_8bit=True)) — the user's path, slower to set up.

Every mode's outcome is in the JSON: "ok", "oom" (torch.cuda.OutOfMemoryError), "skipped"
(a missing package, no GPU, the time budget spent) or "error" with the message; the JSON is
rewritten after every mode (temporary file + rename), so a run killed by `timeout` keeps what
finished. The exit status is 0 whenever the JSON was written: a missing package or an OOM is a
result here, not a failure of the GPU check. Exit 2 for bad arguments.

  python3 scripts/peer_train.py --batch 4 --seq 1024 --accum 1 --r 16 --targets q,k,v,o \\
      --steps 3 --warmup 1 --json peer-train.json [--layers 4]

--device cpu runs the same code on the CPU, to try this script where there is no GPU (its
speed means nothing there; use small shapes):

  python3 scripts/peer_train.py --device cpu --layers 2 --hidden 256 --heads 4 \\
      --intermediate 512 --vocab 1000 --seq 64 --batch 2 --steps 2 --json /tmp/peer.json
"""
import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q,k,v,o")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured optimizer steps first")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--modes", default="bf16,int8", help="comma-separated: bf16, bf16-nockpt, int8")
    p.add_argument("--int8-via", choices=["swap", "checkpoint"], default="swap")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole script (0: none); later modes and steps are skipped")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (the comparison) or cpu (a smoke test of this script on small "
                        "shapes, e.g. on a machine without a GPU; its speed means nothing)")
    a = p.parse_args(argv)
    bad = [n for n in a.targets.split(",") if n.strip() and n.strip() not in TARGET_NAMES]
    if bad:
        p.error(f"unknown LoRA target(s) {bad}: expected some of {', '.join(TARGET_NAMES)}")
    for name in ("batch", "seq", "accum", "r", "steps", "layers", "hidden", "heads", "intermediate", "vocab"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.seq < 2:
        p.error("--seq must be at least 2")
    if a.warmup < 0:
        p.error("--warmup must not be negative")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in ("bf16", "bf16-nockpt", "int8") for m in modes):
        p.error(f"--modes {a.modes!r}: expected some of bf16, bf16-nockpt, int8")
    a.modes = modes
    a.kv_heads = a.kv_heads or a.heads
    return a


def write_json(path, obj):
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def cuda_call(a, torch, name):
    """torch.cuda.<name>() on the GPU; None on the CPU (--device cpu), where memory statistics
    and synchronization do not apply."""
    return getattr(torch.cuda, name)() if a.device == "cuda" else None


def flops_per_step(a, label_rows):
    """bench-train's FLOP count (see Flops in src/bin/bench-train.rs): frozen base, LoRA,
    head on the labelled rows, causal attention; model FLOPs exclude the recomputation."""
    d, f, L, V = a.hidden, a.intermediate, a.layers, a.vocab
    hd = d // a.heads
    qd, kvd = a.heads * hd, a.kv_heads * hd
    n_base = L * (d * qd + 2 * d * kvd + qd * d + 3 * d * f)
    dims = {"q": (d, qd), "k": (d, kvd), "v": (d, kvd), "o": (qd, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}
    targets = sorted({t.strip() for t in a.targets.split(",") if t.strip()})
    n_lora = L * sum(a.r * (dims[t][0] + dims[t][1]) for t in targets)
    seqs = [a.seq] * (a.batch * a.accum)
    T = sum(seqs)
    A = 4 * L * qd * sum(s * (s + 1) // 2 for s in seqs)
    fwd = 2 * n_base * T + 2 * n_lora * T + 2 * d * V * label_rows + A
    bwd = 2 * n_base * T + 4 * n_lora * T + 2 * d * V * label_rows + 2 * A
    rec = (2 * n_base * T + 2 * n_lora * T + A) if not a.no_checkpointing else 0
    return {"N_base_linear_params": n_base, "N_lora_params": n_lora, "model_per_step": fwd + bwd,
            "hardware_per_step": fwd + bwd + rec}


def llama_config(a, transformers):
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(4096, a.seq), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, use_cache=False)
    return cfg


def random_bf16_model(a, torch, transformers):
    """The random LLaMA, built directly on the device in bf16 (no f32 copy, no host round trip)."""
    torch.manual_seed(a.seed)
    cfg = llama_config(a, transformers)
    with torch.device(a.device):
        try:
            # `dtype` since transformers 4.56 (`torch_dtype` before; a deprecation warning in 5.x).
            try:
                model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
            except TypeError:
                model = transformers.LlamaForCausalLM._from_config(cfg, torch_dtype=torch.bfloat16)
        except (AttributeError, TypeError):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = transformers.LlamaForCausalLM(cfg)
            finally:
                torch.set_default_dtype(prev)
    return model.to(torch.bfloat16)


def swap_to_int8(model, a, torch):
    """Replace the layers' linears by bitsandbytes Linear8bitLt, quantizing the bf16 weights the
    way BitsAndBytesConfig(load_in_8bit=True) does (Int8Params moved to the GPU)."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                lin = getattr(parent, n)
                try:
                    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                              has_fp16_weights=False, threshold=a.threshold,
                                              device="meta")
                except TypeError:
                    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                              has_fp16_weights=False, threshold=a.threshold)
                w = lin.weight.data.to("cpu", torch.float16)
                setattr(parent, n, None)
                del lin
                new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                new = new.to(a.device)
                setattr(parent, n, new)
    model.is_loaded_in_8bit = True
    cuda_call(a, torch, "empty_cache")
    return model


def int8_from_checkpoint(a, torch, transformers):
    model = random_bf16_model(a, torch, transformers)
    with tempfile.TemporaryDirectory(prefix="peer-train-") as d:
        model.save_pretrained(d, safe_serialization=True)
        del model
        gc.collect()
        cuda_call(a, torch, "empty_cache")
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=a.threshold)
        place = {"": 0 if a.device == "cuda" else "cpu"}
        try:
            model = transformers.LlamaForCausalLM.from_pretrained(
                d, quantization_config=qc, dtype=torch.bfloat16, device_map=place)
        except TypeError:
            model = transformers.LlamaForCausalLM.from_pretrained(
                d, quantization_config=qc, torch_dtype=torch.bfloat16, device_map=place)
    return model


def run_mode(mode, a, deadline, torch, transformers, peft):
    ckpt = not a.no_checkpointing and mode != "bf16-nockpt"
    out = {"mode": mode, "checkpointing": ckpt}
    t_setup = time.time()
    cuda_call(a, torch, "empty_cache")
    cuda_call(a, torch, "reset_peak_memory_stats")
    if mode == "int8":
        if a.int8_via == "checkpoint":
            model = int8_from_checkpoint(a, torch, transformers)
            out["int8_via"] = "from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True))"
        else:
            model = swap_to_int8(random_bf16_model(a, torch, transformers), a, torch)
            out["int8_via"] = "Linear8bitLt(has_fp16_weights=False) swapped in (what BitsAndBytesConfig(load_in_8bit=True) builds)"
        out["llm_int8_threshold"] = a.threshold
        # What the swap or the loader really built: every frozen linear should hold int8.
        out["int8_linears"] = sum(1 for m in model.modules()
                                  if type(m).__name__ == "Linear8bitLt" and m.weight.dtype == torch.int8)
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = random_bf16_model(a, torch, transformers)
        for p in model.parameters():
            p.requires_grad_(False)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lcfg = peft.LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=sorted({TARGET_NAMES[t.strip()] for t in a.targets.split(",") if t.strip()}))
    model = peft.get_peft_model(model, lcfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["trainable_params"] = sum(p.numel() for p in trainable)
    out["trainable_dtype"] = str(trainable[0].dtype) if trainable else None
    out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    # What the model says, beside what was asked for.
    out["is_gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
    opt = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.0)
    model.train()
    cuda_call(a, torch, "synchronize")
    out["setup_secs"] = time.time() - t_setup
    out["memory_after_setup_bytes"] = cuda_call(a, torch, "memory_allocated")

    g = torch.Generator(device=a.device)
    g.manual_seed(a.seed)
    data = [torch.randint(0, a.vocab, (a.batch, a.seq), device=a.device, generator=g)
            for _ in range(a.accum)]
    tokens = a.batch * a.seq * a.accum
    steps = []
    total = a.warmup + a.steps
    for i in range(total):
        if deadline and time.time() > deadline:
            out["note"] = f"time budget spent after {i} of {total} steps"
            break
        cuda_call(a, torch, "synchronize")
        t0 = time.time()
        loss_sum = 0.0
        for ids in data:
            with torch.autocast(a.device, dtype=torch.bfloat16):
                res = model(input_ids=ids, labels=ids)
            (res.loss / a.accum).backward()
            loss_sum += res.loss.detach().float()
        gn = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss_sum) / a.accum
        cuda_call(a, torch, "synchronize")
        dt = time.time() - t0
        rec = {"step": i + 1, "measured": i >= a.warmup, "loss": loss, "grad_norm": float(gn),
               "secs": dt, "tokens_per_sec": tokens / dt}
        steps.append(rec)
        print(f"peer_train {mode}: {'step' if rec['measured'] else 'warm-up'} {i + 1}/{total}: "
              f"loss {loss:.4f}, {tokens / dt:.0f} tokens/s, {dt * 1e3:.1f} ms", file=sys.stderr)
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss is not finite at step {i + 1}: {loss}")
    measured = [s for s in steps if s["measured"]]
    out["steps"] = steps
    out["peak_memory_allocated_bytes"] = cuda_call(a, torch, "max_memory_allocated")
    out["peak_memory_reserved_bytes"] = cuda_call(a, torch, "max_memory_reserved")
    if measured:
        out["status"] = "ok"
        # As bench-train counts it: a step's tokens at the median step time.
        step_secs = statistics.median(s["secs"] for s in measured)
        out["tokens_per_sec"] = tokens / step_secs
        out["step_ms"] = step_secs * 1e3
        out["measured_steps"] = len(measured)
    else:
        out["status"] = "skipped"
        out.setdefault("note", "no measured step finished")
    del model, opt, trainable
    return out


def main(argv):
    a = parse_args(argv)
    start = time.time()
    deadline = start + a.time_budget if a.time_budget > 0 else None
    res = {
        "tool": "peer_train.py",
        "config": {"batch": a.batch, "seq": a.seq, "accum": a.accum, "tokens_per_step": a.batch * a.seq * a.accum,
                   "r": a.r, "alpha": a.alpha, "dropout": a.dropout, "targets": a.targets,
                   "layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
                   "intermediate": a.intermediate, "vocab": a.vocab, "checkpointing": not a.no_checkpointing,
                   "warmup_steps": a.warmup, "measured_steps": a.steps, "lr": a.lr, "optimizer": "torch AdamW",
                   "seed": a.seed},
        "flops": flops_per_step(a, (a.seq - 1) * a.batch * a.accum),
        "runs": {},
    }
    try:
        import torch
        import transformers
        import peft
        res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "python": sys.version.split()[0]}
    except Exception as e:  # a missing package is a result, not a crash
        res["status"] = "skipped"
        res["error"] = f"{type(e).__name__}: {e}"
        print(f"peer_train: skipped: {res['error']}")
        write_json(a.json, res)
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        res["status"] = "skipped"
        res["error"] = "torch sees no CUDA device"
        print("peer_train: skipped: torch sees no CUDA device")
        write_json(a.json, res)
        return 0
    res["device"] = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    try:
        import bitsandbytes
        res["versions"]["bitsandbytes"] = bitsandbytes.__version__
        have_bnb = True
    except Exception as e:
        have_bnb = False
        bnb_error = f"{type(e).__name__}: {e}"
    write_json(a.json, res)
    for mode in a.modes:
        if mode == "int8" and not have_bnb:
            res["runs"][mode] = {"mode": mode, "status": "skipped", "error": f"import bitsandbytes failed: {bnb_error}"}
        elif deadline and time.time() > deadline:
            res["runs"][mode] = {"mode": mode, "status": "skipped", "error": "time budget spent before this mode"}
        else:
            print(f"peer_train: {mode} on {res['device']} ...", file=sys.stderr)
            try:
                res["runs"][mode] = run_mode(mode, a, deadline, torch, transformers, peft)
            except torch.cuda.OutOfMemoryError as e:
                res["runs"][mode] = {"mode": mode, "status": "oom", "error": str(e).splitlines()[0],
                                     "peak_memory_allocated_bytes": cuda_call(a, torch, "max_memory_allocated")}
            except Exception as e:
                res["runs"][mode] = {"mode": mode, "status": "error", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc(limit=6)}
            gc.collect()
            cuda_call(a, torch, "empty_cache")
        r = res["runs"][mode]
        if r.get("status") == "ok":
            peak = r.get("peak_memory_allocated_bytes")
            peak = f", peak {peak / 2**30:.2f} GiB allocated" if peak is not None else ""
            print(f"peer_train {mode}: {r['tokens_per_sec']:.0f} tokens/s (at the median of {r['measured_steps']} steps), "
                  f"{r['step_ms']:.1f} ms/step{peak}")
        else:
            print(f"peer_train {mode}: {r.get('status')}: {r.get('error') or r.get('note')}")
        write_json(a.json, res)
    ok = [m for m, r in res["runs"].items() if r.get("status") == "ok"]
    res["status"] = "ok" if ok else "failed"
    res["ran"] = ok
    res["secs"] = time.time() - start
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

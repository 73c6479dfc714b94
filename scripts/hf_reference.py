#!/usr/bin/env python3
"""Reference logits of SmolLM2-135M-Instruct from Hugging Face transformers (and PEFT), an
implementation independent of recforge, for tests/hf_reference.rs.

transformers reads the same Q4_1 GGUF file itself (its own dequantization and its own undoing of
llama.cpp's q/k row permutation, through the `gguf` package) and runs it in f32. For each text
the JSON records the token ids of transformers' tokenizer and, at every position, the top
logits and the log-sum-exp of the whole row; once for the base model and once with a LoRA
adapter on all seven projections whose weights are a closed form (`pattern_value` below;
tests/hf_reference.rs computes the same), applied by PEFT. Nothing here is computed by
recforge (the TALLRec sample's text is input data; the optional check below reads recforge's
files), so the reference is not the code under test.

  recforge rec data tallrec --split valid --out /tmp/valid.json   # the TALLRec text's sample
  python3 scripts/hf_reference.py --gguf assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --tallrec /tmp/valid.json --out tests/data/hf_reference.json [--recforge-adapter DIR]

It also records PyTorch's AdamW under transformers' cosine schedule with clip_grad_norm_ on
closed-form tensors (`OPTIM`), and Hugging Face's sampling warpers on closed-form logit rows
(`SAMPLING`), and one training step on the TALLRec text (loss on the response tokens only): the
mean loss and, for each LoRA gradient, its L2 norm and its dot products with closed-form probe
directions (`probe`), which tests/hf_reference.rs compares with recforge's backward pass.

--recforge-adapter DIR: an adapter recforge saved with the same pattern weights
(RECFORGE_SAVE_PATTERN_ADAPTER=DIR cargo test --release --test hf_reference writes one). PEFT
loads it with PeftModel.from_pretrained, and the JSON records whether PEFT accepted it and the
largest difference of its logits from the PEFT-built adapter's.

Needs torch, transformers (>= 4.56, with GGUF support), peft and gguf; CPU only. The JSON is
written to a temporary name and renamed.
"""
import argparse
import hashlib
import json
import math
import os
import sys

# The adapter: r 4, alpha 8 (scale 2), no dropout, on every projection. Target codes as in
# tests/hf_reference.rs.
PATTERN = {
    "r": 4,
    "alpha": 8.0,
    "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "amplitude": 0.05,
}
TOP_EVERY = 5  # top logits kept at every position
PROBES = 3  # closed-form directions each LoRA gradient is projected on (`probe`)
TOP_LAST = 40  # ... and at the last one


def pattern_value(which, layer, target, i, j):
    """A[i, j] (which = "A": rank i, input j) or B[i, j] (which = "B": output i, rank j), in f64
    then rounded to f32 by the caller. Smooth, sign-changing, different in every layer and
    target, and independent of any random number generator."""
    code = PATTERN["targets"].index(target) + 1
    if which == "A":
        return PATTERN["amplitude"] * math.sin(0.37 * (i + 1) + 0.011 * j + 0.53 * layer + 0.9 * code)
    return PATTERN["amplitude"] * math.cos(0.23 * (j + 1) + 0.017 * i + 0.41 * layer + 1.3 * code)


def probe(k, n):
    """The k-th probe direction over a gradient of n values (row-major), f64."""
    return [math.sin(0.731 * (i + 1) * (k + 1) + 0.5 * k) for i in range(n)]


def grad_summary(g):
    """The L2 norm of a gradient and its dot products with the probes: a compact fingerprint
    that a wrong scale, sign, transposition or missing term changes."""
    flat = [float(x) for x in g.double().flatten()]
    return {"norm": math.sqrt(sum(x * x for x in flat)),
            "probes": [sum(a * b for a, b in zip(flat, probe(k, len(flat)))) for k in range(PROBES)]}


# The optimizer check: two small tensors (shaped like a LoRA A [2, 5] and B [3, 2]) updated by
# PyTorch's AdamW under transformers' cosine schedule with warm-up and clip_grad_norm_, with
# closed-form initial values and gradients (`optim_value`; tests/hf_reference.rs has the same).
OPTIM = {"shapes": [[2, 5], [3, 2]], "lr": 5e-2, "warmup": 2, "total": 8, "steps": 9,
         "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "max_norm": 1.0}


def optim_value(what, tensor, step, i):
    """Initial value (what = "init") or the gradient of update `step` (0-based) of element i of
    tensor 0 or 1, f64. Every other update's gradients are large enough to be clipped."""
    if what == "init":
        return 0.5 * math.cos(0.3 * i + 1.1 * tensor)
    amp = 3.0 if step % 2 else 0.1
    return amp * math.sin(0.9 * i + 1.7 * step + 0.4 * tensor)


def optimizer_reference(torch, transformers):
    o = OPTIM
    params = [torch.nn.Parameter(torch.tensor([optim_value("init", t, 0, i) for i in range(r * c)],
                                              dtype=torch.float64).float().reshape(r, c))
              for t, (r, c) in enumerate(o["shapes"])]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])
    sched = transformers.get_cosine_schedule_with_warmup(opt, o["warmup"], o["total"])
    steps = []
    for s in range(o["steps"]):
        for t, p in enumerate(params):
            p.grad = torch.tensor([optim_value("grad", t, s, i) for i in range(p.numel())],
                                  dtype=torch.float64).float().reshape(p.shape)
        lr = opt.param_groups[0]["lr"]
        norm = float(torch.nn.utils.clip_grad_norm_(params, o["max_norm"]))
        opt.step()
        sched.step()
        steps.append({"lr": lr, "grad_norm": norm,
                      "params": [[float(x) for x in p.detach().flatten()] for p in params]})
    return dict(o, updates=steps)


# The sampling check: Hugging Face's warpers (temperature, then top-k, then top-p, as
# `generate` applies them) on closed-form logit rows (`sampling_logit`), and the probability of
# every token they keep. (temperature, top-k, top-p); top-k 0 and top-p 1 are off.
SAMPLING = {"vocab": 512, "rows": 4,
            "params": [[1.0, 0, 0.9], [0.7, 50, 1.0], [1.0, 20, 0.5], [0.1, 10, 0.1],
                       [2.0, 0, 0.95], [1.0, 5, 1.0], [0.5, 40, 0.8]]}


def sampling_logit(row, i):
    return 4.0 * math.sin(0.37 * i * (row + 1) + 0.3 * row) + 0.5 * math.cos(1.3 * i)


def sampling_reference(torch):
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    v = SAMPLING["vocab"]
    out = []
    for row in range(SAMPLING["rows"]):
        logits = torch.tensor([[sampling_logit(row, i) for i in range(v)]], dtype=torch.float64).float()
        for t, k, p in SAMPLING["params"]:
            x = TemperatureLogitsWarper(t)(None, logits.clone())
            if k > 0:
                x = TopKLogitsWarper(k)(None, x)
            if p < 1.0:
                x = TopPLogitsWarper(p)(None, x)
            probs = torch.softmax(x[0].double(), 0)
            kept = [i for i in range(v) if math.isfinite(float(x[0, i]))]
            # The decisions must not hang on a rounding: the k-th and the (k+1)-th logits differ,
            # and the top-p boundary has room on both sides.
            srt = sorted((float(a) for a in logits[0]), reverse=True)
            if k > 0:
                assert srt[k - 1] - srt[k] > 1e-4, (row, t, k, p)
            if p < 1.0:
                kk = k if k > 0 else v
                z = torch.softmax(logits[0].double() / t, 0)
                top = sorted(z.tolist(), reverse=True)[:kk]
                tot = sum(top)
                above, n = 0.0, 0
                while n < len(top) and above / tot < p:
                    above += top[n]
                    n += 1
                assert n == len(kept), (row, t, k, p, n, len(kept))
                assert abs(above / tot - p) > 1e-5 and abs((above - top[n - 1]) / tot - p) > 1e-5
            out.append({"row": row, "temperature": t, "top_k": k, "top_p": p,
                        "kept": [[i, float(probs[i])] for i in kept]})
    return dict(SAMPLING, cases=out)


def lora_modules(model):
    """(layer, target name, module) for every adapted projection of a PEFT LLaMA, in layer
    order, then PATTERN's target order."""
    for layer_i, layer in enumerate(model.base_model.model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for tname in PATTERN["targets"]:
                mod = getattr(parent, tname, None)
                if mod is not None:
                    yield layer_i, tname, mod


def tallrec_prompt(sample):
    # TALLRec's Alpaca template (src/rec/prompt.rs has the same text and its own test).
    return ("Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{sample['instruction']}\n\n### Input:\n{sample['input']}\n\n"
            "### Response:\n")


def summarize(logits, torch):
    """Per position: the top logits (id, value) and the row's log-sum-exp, in f64."""
    rows = []
    t = logits.shape[0]
    for p in range(t):
        row = logits[p].double()
        k = TOP_LAST if p == t - 1 else TOP_EVERY
        v, i = row.topk(k)
        rows.append({"top": [[int(a), float(b)] for a, b in zip(i, v)],
                     "logsumexp": float(torch.logsumexp(row, 0))})
    return rows


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--tallrec", required=True, help="a TALLRec JSON file (recforge rec data tallrec); its first sample is one text")
    p.add_argument("--out", required=True)
    p.add_argument("--recforge-adapter", default=None)
    a = p.parse_args(argv)

    import torch
    import transformers
    import peft
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    base.eval()
    with open(a.tallrec) as fh:
        sample = json.load(fh)[0]
    prompt = tallrec_prompt(sample)
    texts = [
        ("question", "What is the capital of France?"),
        ("tallrec", prompt + sample["output"]),
        ("mixed", "Le café coûte 3,50 € — très cher!\n\tOK  def f(x):\n    return x**2  # ✓ 日本語 2024"),
    ]
    cases = []
    for name, text in texts:
        ids = tok(text, add_special_tokens=True).input_ids
        cases.append({"name": name, "text": text, "ids": ids})

    def run(model):
        out = []
        with torch.no_grad():
            for c in cases:
                logits = model(torch.tensor([c["ids"]])).logits[0]
                out.append((logits, summarize(logits, torch)))
        return out

    base_out = run(base)
    cfg = peft.LoraConfig(r=PATTERN["r"], lora_alpha=PATTERN["alpha"], lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", target_modules=PATTERN["targets"])
    model = peft.get_peft_model(base, cfg)
    model.eval()
    n_set = 0
    for layer_i, tname, mod in lora_modules(model):
        wa = mod.lora_A["default"].weight  # [r, in]
        wb = mod.lora_B["default"].weight  # [out, r]
        with torch.no_grad():
            wa.copy_(torch.tensor([[pattern_value("A", layer_i, tname, i, j) for j in range(wa.shape[1])]
                                   for i in range(wa.shape[0])], dtype=torch.float64).float())
            wb.copy_(torch.tensor([[pattern_value("B", layer_i, tname, i, j) for j in range(wb.shape[1])]
                                   for i in range(wb.shape[0])], dtype=torch.float64).float())
        n_set += 1
    lora_out = run(model)
    effect = max(float((x[0] - y[0]).abs().max()) for x, y in zip(base_out, lora_out))

    # One training step's loss and LoRA gradients on the TALLRec text, the loss on the response
    # tokens only (TALLRec's masking): the tokens after the prompt's own tokens.
    tc = next(c for c in cases if c["name"] == "tallrec")
    n_prompt = len(tok(prompt, add_special_tokens=True).input_ids)
    assert tc["ids"][:n_prompt] == tok(prompt, add_special_tokens=True).input_ids
    labels = [-100] * n_prompt + tc["ids"][n_prompt:]
    model.train()  # dropout is 0: train mode changes nothing but autograd's bookkeeping
    model.zero_grad(set_to_none=True)
    res_loss = model(torch.tensor([tc["ids"]]), labels=torch.tensor([labels])).loss
    res_loss.backward()
    grads = [{"layer": layer_i, "module": tname,
              "A": grad_summary(mod.lora_A["default"].weight.grad),
              "B": grad_summary(mod.lora_B["default"].weight.grad)}
             for layer_i, tname, mod in lora_modules(model)]
    model.eval()
    training = {"case": "tallrec", "prompt_tokens": n_prompt,
                "labelled_tokens": len(tc["ids"]) - n_prompt, "loss": res_loss.detach().item(),
                "probes": PROBES, "grads": grads}

    res = {
        "generated_by": "scripts/hf_reference.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": sys.version.split()[0]},
        "gguf": {"file": f, "bytes": os.path.getsize(a.gguf),
                 "sha256": hashlib.sha256(open(a.gguf, "rb").read()).hexdigest()},
        "dtype": "float32",
        "adapter_pattern": dict(PATTERN, modules_set=n_set,
                                max_logit_change_over_the_base=effect),
        "cases": [dict(c, base=b[1], lora=l[1]) for c, b, l in zip(cases, base_out, lora_out)],
        "training": training,
        "optimizer": optimizer_reference(torch, transformers),
        "sampling": sampling_reference(torch),
    }
    if a.recforge_adapter:
        try:
            loaded = peft.PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32),
                a.recforge_adapter)
            loaded.eval()
            diff = max(float((x[0] - y[0]).abs().max()) for x, y in zip(run(loaded), lora_out))
            res["recforge_adapter"] = {"loaded_by_peft": True, "max_logit_difference": diff}
        except Exception as e:  # recorded, not raised: the reference above stands on its own
            res["recforge_adapter"] = {"loaded_by_peft": False, "error": f"{type(e).__name__}: {e}"}
        print(f"recforge's adapter in PEFT: {res['recforge_adapter']}")
    print(f"{len(cases)} texts, {n_set} adapted modules, largest logit change from the adapter {effect:.3f}")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{os.path.basename(a.out)}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(res, fh, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""The sort-based peer for the sampling benchmark: Hugging Face's warpers as PyTorch runs them on
the GPU (temperature, top-k with torch.topk, top-p with a full torch.sort + softmax + cumsum, then
torch.multinomial) on the same shapes and presets as benches/kernels_sampling.rs (cuda_sample),
timed with CUDA events. Prints one line per shape: preset, vocab, batch, median ms. Runs on the
GPU machine in scripts/gpu-check.sh; needs PyTorch with CUDA. Exits 0 with a 'skipped' line
otherwise."""
import statistics
import sys

PRESETS = [("itrek", 0.1, 10, 0.1), ("wide", 1.0, 50, 0.9)]


def sample(torch, logits, t, k, p):
    x = logits / t
    kth = torch.topk(x, k, dim=-1).values[..., -1, None]
    x = x.masked_fill(x < kth, float("-inf"))
    sx, si = torch.sort(x, descending=False, dim=-1)
    cum = sx.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -1:] = False
    x = x.masked_fill(remove.scatter(-1, si, remove), float("-inf"))
    return torch.multinomial(x.softmax(dim=-1), 1)


def main() -> int:
    try:
        import torch
    except ImportError:
        print("peer_sampling: skipped: no torch")
        return 0
    if not torch.cuda.is_available():
        print("peer_sampling: skipped: torch sees no CUDA device")
        return 0
    print(f"peer_sampling: torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for v in (32000, 49152):
        for batch in (1, 4, 16, 64):
            logits = 3.0 * torch.randn(batch, v, device="cuda", dtype=torch.float32)
            for name, t, k, p in PRESETS:
                for _ in range(5):
                    sample(torch, logits, t, k, p)
                times = []
                for _ in range(50):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    sample(torch, logits, t, k, p)
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e))
                print(f"peer_sampling {name}/v{v}/{batch}: median {statistics.median(times) * 1000:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The cuBLASLt int8 peer for the W8A8 GEMM benchmark: times torch._int_mm (int8 x int8 -> int32,
cuBLASLt underneath) on the same shapes as benches/kernels_linear.rs (cuda_gemm_w8a8), with CUDA
events, and prints one line per shape: name, median ms, TOPS. Runs on the GPU machine in
scripts/gpu-check.sh; needs PyTorch with CUDA. Exits 0 with a 'skipped' line otherwise."""
import statistics
import sys

SHAPES = [
    ("7b_qkvo", 4096, 4096, 4096),
    ("7b_gate_up", 4096, 11008, 4096),
    ("7b_down", 4096, 4096, 11008),
    ("smol_gate_up", 1024, 1536, 576),
    ("smol_down", 1024, 576, 1536),
]


def main() -> int:
    try:
        import torch
    except ImportError:
        print("peer_int8_mm: skipped: no torch")
        return 0
    if not torch.cuda.is_available():
        print("peer_int8_mm: skipped: torch sees no CUDA device")
        return 0
    print(f"peer_int8_mm: torch {torch.__version__} on {torch.cuda.get_device_name()}")
    for name, m, n, k in SHAPES:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        # torch._int_mm takes B as [K, N]; a column-major view of a [N, K] weight, as we store it.
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda").t()
        for _ in range(5):
            torch._int_mm(a, b)
        times = []
        for _ in range(30):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch._int_mm(a, b)
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        med = statistics.median(times)
        print(f"peer_int8_mm {name} M={m} N={n} K={k}: median {med:.3f} ms, {2 * m * n * k / med / 1e9:.1f} TOPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak extra memory of pissa_fast.qpissa on one bf16 weight, against the weight's own size.

    python benchmarks/qpissa_memory.py --shape 2048 2048 --iters 2

Resets the kernel's peak-RSS counter after the weight exists and the libraries are warm
(/proc/self/clear_refs), runs qpissa (in place), and reads VmHWM: what the call added at its peak.
CPU/Linux only.
"""
import argparse

import torch

from pissa_fast.quant import qpissa


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[2048, 2048])
    p.add_argument("-r", "--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    qpissa(torch.randn(128, 256).to(torch.bfloat16), 4, iters=1)  # load bnb, peft, kernels
    W = (torch.randn(*a.shape) * 0.02).to(torch.bfloat16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    out = qpissa(W, a.rank, 4, iters=a.iters, inplace=True)
    peak = _status("VmHWM") - base
    size = W.numel() * W.element_size()
    print(f"shape {tuple(W.shape)} bf16 ({size / 2**20:.1f} MiB), r {a.rank}, iters {a.iters}: "
          f"peak extra {peak / 2**20:.1f} MiB = {peak / size:.2f}x the weight; exact={out.exact}")


if __name__ == "__main__":
    main()

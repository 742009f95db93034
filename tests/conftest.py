"""Shared test setup. Tests run on small tensors on a shared 2-core machine: one intra-op
thread avoids OpenMP spin-waiting against other processes (and makes timings steadier)."""
import torch

torch.set_num_threads(1)

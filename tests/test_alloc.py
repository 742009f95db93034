"""study.alloc: evaluations stop faulting in fresh pages once the allocator keeps freed blocks."""
from __future__ import annotations

import subprocess
import sys

CHILD = """
import resource, torch
torch.set_num_threads(1)
from study.config import TrialConfig
from study.train import Trainer
from study.alloc import keep_freed_blocks
trainer = Trainer(TrialConfig.from_dict(dict(depth=4, width=300, n_samples=10000, num_classes=4,
                                             device="cpu", epochs=1, eval_every=1)))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    trainer.evaluate()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(keep_freed_blocks(), *faults)
"""


def test_evaluations_reuse_their_blocks_instead_of_faulting_in_new_pages():
    """A fresh process, as a Ray worker is: Trainer sets the allocator up, and after the first
    two evaluations (the heap settling) an evaluation of 10 000 x 300 features mostly faults
    in almost no new pages, never more than two feature arrays' worth. Without it, glibc here
    gave each one 14 600–17 500 (60–70 MB of pages zeroed and mapped), evaluation after
    evaluation."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    assert applied == "True"
    steady = sorted(int(n) for n in faults[2:])
    # one 12 MB array of features is 2 930 pages; now and then one is faulted in afresh
    # (seen in 1 evaluation of 10, with or without the fused sweeps), never the whole set
    assert steady[len(steady) // 2] < 500 and steady[-1] < 6000, faults

"""Run by test_ddp.py under torchrun: DenseFormer's demo (pretrain → train → evaluate, tiny preset) on 2 gloo
ranks. Rank 1 returned from pretrain before rank 0 had written the model that train starts from."""

from __future__ import annotations

import sys

from neuromoe.pipelines import denseformer

if __name__ == "__main__":
    denseformer.demo(sys.argv[1], sys.argv[2], device="cpu", preset="tiny")

"""The per-client diagnostics a run logs: what part of the global it started from a client's rank could not hold."""

from __future__ import annotations

import torch

from experiments.diagnostics import module_norms, tail_share, total
from schemas.lora import LoraFactors, RankRequest, recut


def test_the_tail_share_is_what_a_cut_leaves_out() -> None:
    # G = diag(3, 4) as a rank-2 cut (B = UΣ/scale, A = Vᵀ); its rank-1 cut keeps σ = 4, leaving 3 of ‖G‖ = 5.
    g = {"m": LoraFactors(A=torch.eye(2), B=torch.diag(torch.tensor([4.0, 3.0])))}
    top, small = RankRequest(2, 2.0), RankRequest(1, 1.0)
    whole = total(module_norms(g, top.alpha / top.rank))
    kept = total(module_norms(recut(g, top, small), small.alpha / small.rank))
    assert abs(tail_share(whole, kept) - 3 / 5) < 1e-9
    assert tail_share(whole, whole) == 0.0 and tail_share(0.0, 0.0) == 0.0

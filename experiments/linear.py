"""A synthetic linear benchmark that runs in seconds: every task is a linear map whose weight change from a
shared base is a common low-rank part plus a small task-specific one; each client fits LoRA at its rank to
noisy samples of its own task, and the global update is scored on unseen tasks (relative squared error).

Low-rank clients can only learn the top directions of the shared part, so a federation held to the weakest
client's rank (FedIT at the minimum rank) cannot generalise as well as one that lets strong clients learn
more (the "bucket effect" FlexLoRA removes)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from experiments.federation import Factors
from experiments.runner import Trained
from schemas.lora import LoraFactors

MODULE = "model.layers.0.mlp.proj"  # PEFT-style name, so updates travel through the service unchanged


@dataclass(frozen=True)
class LinearConfig:
    d_out: int = 48
    d_in: int = 48
    shared_rank: int = 16  # rank of the part every task shares (what generalises)
    spectrum_decay: float = 0.85  # singular values of the shared part: 1, decay, decay², …
    task_rank: int = 2
    task_scale: float = 0.3  # task-specific part's size relative to the shared part's top direction
    seen_tasks: int = 40  # one per client
    unseen_tasks: int = 20
    samples: int = 96
    noise: float = 0.1
    local_steps: int = 25
    learning_rate: float = 0.05
    seed: int = 0


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q: torch.Tensor = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]
    return q


@dataclass
class LinearWorkload:
    """Tasks, clients' data and the base weight of the linear benchmark (see the module docstring)."""

    config: LinearConfig = field(default_factory=LinearConfig)
    target_modules: tuple[str, ...] = ("proj",)
    fingerprint: str = hashlib.sha256(b"flexlora linear benchmark").hexdigest()
    metrics: tuple[str, ...] = ("unseen", "seen")
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        c = self.config
        gen = _generator("shared", c.seed)
        sigma = torch.tensor([c.spectrum_decay**i for i in range(c.shared_rank)], dtype=torch.float64)
        u, v = _orthonormal(c.d_out, c.shared_rank, gen), _orthonormal(c.d_in, c.shared_rank, gen)
        self.shared = u @ torch.diag(sigma) @ v.T
        self.seen = [self._task("seen", t) for t in range(c.seen_tasks)]
        self.unseen = [self._task("unseen", t) for t in range(c.unseen_tasks)]
        self.data: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t, delta in enumerate(self.seen):
            g = _generator("data", c.seed, t)
            x = torch.randn(c.samples, c.d_in, generator=g, dtype=torch.float64)
            y = x @ delta.T + c.noise * torch.randn(c.samples, c.d_out, generator=g, dtype=torch.float64)
            self.data.append((x.float(), y.float()))
        self.reset()

    def _task(self, kind: str, index: int) -> torch.Tensor:
        c = self.config
        gen = _generator(kind, c.seed, index)
        u, v = _orthonormal(c.d_out, c.task_rank, gen), _orthonormal(c.d_in, c.task_rank, gen)
        return self.shared + c.task_scale * u @ v.T

    def reset(self) -> None:
        self.base = torch.zeros(self.config.d_out, self.config.d_in)

    def alpha(self, rank: int) -> float:
        # Plain gradient descent at a fixed step is stable at a scale of 2 at every rank.
        return 2.0 * rank

    def fresh(self, rank: int) -> Factors:
        """PEFT's initial LoRA: A uniform like Kaiming, B zero; the same for every client of a rank."""
        gen = _generator("init", self.config.seed, rank)
        bound = 1.0 / self.config.d_in**0.5
        a = (torch.rand(rank, self.config.d_in, generator=gen) * 2 - 1) * bound
        return {MODULE: LoraFactors(A=a, B=torch.zeros(self.config.d_out, rank))}

    def train(self, client: int, rank: int, alpha: float, start: Factors | None) -> Trained:
        x, y = self.data[client]
        init = start if start is not None else self.fresh(rank)
        a = init[MODULE].A.detach().clone().float().requires_grad_(True)
        b = init[MODULE].B.detach().clone().float().requires_grad_(True)
        scale = alpha / rank
        losses = []
        # Plain gradient descent: deterministic, and no optimiser state to carry between rounds.
        for _ in range(self.config.local_steps):
            prediction = x @ (self.base + scale * b @ a).T
            loss = ((prediction - y) ** 2).sum(dim=1).mean()
            grad_a, grad_b = torch.autograd.grad(loss, [a, b])
            with torch.no_grad():
                a -= self.config.learning_rate * grad_a
                b -= self.config.learning_rate * grad_b
            losses.append(float(loss.detach()))
        factors = {MODULE: LoraFactors(A=a.detach(), B=b.detach())}
        return Trained(factors, len(x), sum(losses) / len(losses))

    def merge(self, factors: Factors, scale: float) -> None:
        f = factors[MODULE]
        self.base = self.base + scale * (f.B.float() @ f.A.float())

    def global_delta(self, factors: Factors | None, rank: int, alpha: float) -> torch.Tensor:
        delta = self.base.double()
        if factors is not None:
            f = factors[MODULE]
            delta = delta + (alpha / rank) * (f.B.double() @ f.A.double())
        return delta

    def evaluate(
        self, factors: Factors | None, rank: int, alpha: float, *, round_index: int = 0, last: bool = True
    ) -> dict[str, float]:
        """Mean relative squared error ‖G − ΔW_t‖² / ‖ΔW_t‖² of the global update G over unseen and seen tasks."""
        g = self.global_delta(factors, rank, alpha)

        def error(tasks: list[torch.Tensor]) -> float:
            return float(sum(float(((g - t) ** 2).sum() / (t**2).sum()) for t in tasks) / len(tasks))

        return {"unseen": error(self.unseen), "seen": error(self.seen)}

    def floor(self, rank: int) -> float:
        """The best unseen error any rank-`rank` update can reach: that of the shared part's best rank-r cut."""
        u, s, vh = torch.linalg.svd(self.shared)
        best = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        return float(sum(float(((best - t) ** 2).sum() / (t**2).sum()) for t in self.unseen) / len(self.unseen))

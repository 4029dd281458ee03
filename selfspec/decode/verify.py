"""Acceptance rules: which drafted tokens the full model keeps, and the token it adds after them.

Both take the full model's logits over the verified inputs: row i scores the token after input i, so row i
checks proposal i, and a row past the last proposal (when there is one) gives a bonus token.
"""

import torch

from ..sampling import Sampler, greedy_index


def accept_greedy(proposals: list[int], target_logits: torch.Tensor) -> tuple[int, int | None]:
    """Longest prefix of proposals equal to the full model's argmax, then the model's own next token.

    target_logits: [k, V] with k = len(proposals) or len(proposals) + 1.
    Returns (accepted count, next token or None when every proposal was kept and no row is left).
    """
    targets = greedy_index(target_logits).tolist()
    n = 0
    while n < len(proposals) and proposals[n] == targets[n]:
        n += 1
    return n, (targets[n] if n < len(targets) else None)


def accept_sampled(
    proposals: list[int], draft_probs: torch.Tensor, target_logits: torch.Tensor, sampler: Sampler
) -> tuple[int, int | None]:
    """Speculative sampling (Leviathan et al.; Chen et al.): keep proposal i with probability min(1, p/q);
    on the first rejection draw from norm(max(0, p - q)); after all are kept, draw the bonus from p.
    The emitted tokens are then distributed exactly as sampling from p one token at a time.

    draft_probs: [len(proposals), V], the distribution each proposal was drawn from.
    """
    target_probs = sampler.probs(target_logits)  # [k, V]
    for i, token in enumerate(proposals):
        p, q = target_probs[i, token], draft_probs[i, token]
        u = torch.rand((), generator=sampler.generator, device=p.device)
        if u * q < p:  # u < p / q without dividing by a zero q
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        return i, int(sampler.sample(residual[None] / residual.sum())[0])
    if target_probs.shape[0] > len(proposals):
        return len(proposals), int(sampler.sample(target_probs[len(proposals)][None])[0])
    return len(proposals), None

"""LoRA-LEGO: merge LoRAs rank by rank, by clustering their rank-1 units.

Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes
Through Rank-Wise Clustering", ICLR 2025, https://arxiv.org/abs/2409.16167.

A LoRA update is a sum of rank-1 terms, s B A = sum_j s b_j a_j (b_j column j of B, a_j row j
of A): the paper's minimal semantic units (MSUs). Reordering them changes nothing
(permutation invariance) and the units of several LoRAs side by side are their sum
(concatenation-summation equivalence, i.e. `cat`). Per module:

1. Disassemble: every unit of every adapter as one vector [b; a] (out + in), with w_i s_i
   split as in PEFT's factor merges: sqrt(|w_i s_i|) on each factor, the sign on a.
2. Orient: (b, a) and (-b, -a) are the same unit (same product); each vector is turned so
   its largest-magnitude entry is positive, or k-means would see a unit and its negation as
   opposite points whose mean is zero. (The paper does not discuss this ambiguity.)
3. Cluster: k-means into k clusters (k-means++ seeds from a seeded generator, Lloyd
   iterations to a fixed point), on the raw [b; a] vectors.
4. Reassemble: cluster c's centroid [b_c; a_c] is rank c of the merged LoRA, B A = sum_c b_c a_c.
5. Dual reweighting (the paper's "parameter reweighting" against norm decay and "output
   reweighting" against variance expansion): a mean of unaligned vectors is shorter than
   they are, so each centroid is rescaled to the mean norm of its cluster's units; and the
   output of a rank-k sum of units grows in variance with k, so the merged update is scaled
   by sqrt(r / k), r the adapters' (largest) rank. Both are 1 where no units are averaged
   (one unit per cluster) or k = r.

   CAVEAT: these two formulas are this file's reading of the paper's description, not yet
   checked against its equations (the paper's text was not at hand when this was written);
   a third-party reimplementation rescales by the largest absolute entry instead of the
   Euclidean norm. Check section 4 of the paper before relying on the exact scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from soups.adapters import LoraModule
from soups.lazy import lazy

torch = lazy("torch")  # imported on first use (soups/lazy.py)

MAX_ITERATIONS = 100  # Lloyd's iterations; a fixed point comes after a few on MSU pools


def units(modules: Sequence[LoraModule], weights: Sequence[float]) -> torch.Tensor:
    """Every rank-1 unit as a row [b; a] (float64, (sum r_i, out + in)), w_i s_i folded in,
    oriented (step 2). Units that are exactly zero (weight 0, an untrained B column) are left
    out: they would only pull centroids to the origin."""
    rows = []
    for module, weight in zip(modules, weights, strict=True):
        factor = weight * module.scaling
        root = math.sqrt(abs(factor))
        b = module.B.double().T * root                                 # (r, out)
        a = module.A.double() * (root if factor >= 0 else -root)       # (r, in)
        rows.append(torch.cat([b, a], dim=1))
    pool = torch.cat(rows)
    return orient(pool[pool.abs().amax(dim=1) > 0])


def orient(vectors: torch.Tensor) -> torch.Tensor:
    """Each row turned so its largest-magnitude entry (the first, on ties) is positive:
    v and -v map to the same row."""
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    return vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster labels (n,) of the rows of `points` (n, d) into k nonempty clusters (k-means++
    seeding, Arthur & Vassilvitskii 2007, then Lloyd's iterations); label i for row i when
    k >= n. The same generator state gives the same labels."""
    n = points.shape[0]
    if k >= n:
        return torch.arange(n)
    centers = points[_seeds(points, k, generator)]
    labels = None
    for _ in range(MAX_ITERATIONS):
        distance = torch.cdist(points, centers, compute_mode="donot_use_mm_for_euclid_dist")
        new = _fill_empty(distance.argmin(dim=1), distance.min(dim=1).values, k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = torch.stack([points[labels == c].mean(dim=0) for c in range(k)])
    return labels


def _seeds(points: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k-means++: each next seed drawn with probability proportional to its squared distance
    to the nearest seed so far."""
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (points - points[chosen[0]]).square().sum(dim=1)
    for _ in range(1, k):
        if nearest.sum() > 0:
            pick = int(torch.multinomial(nearest / nearest.sum(), 1, generator=generator))
        else:  # every point sits on a seed (repeated units): take the first one not chosen
            pick = next(i for i in range(n) if i not in chosen)
        chosen.append(pick)
        nearest = torch.minimum(nearest, (points - points[pick]).square().sum(dim=1))
    return chosen


def _fill_empty(labels: torch.Tensor, distance: torch.Tensor, k: int) -> torch.Tensor:
    """An empty cluster takes the point farthest from its centre among clusters of two or
    more, so the merged LoRA keeps rank k."""
    counts = torch.bincount(labels, minlength=k)
    for empty in (counts == 0).nonzero().flatten().tolist():
        for point in distance.argsort(descending=True).tolist():
            if counts[labels[point]] > 1:
                counts[labels[point]] -= 1
                labels[point], counts[empty], distance[point] = empty, 1, 0.0
                break
    return labels


def lora_lego(modules: Sequence[LoraModule], weights: Sequence[float], rank: int,
              generator: torch.Generator) -> LoraModule:
    """LoRA-LEGO merge of k modules (A_i (r_i, in), B_i (out, r_i)) with one weight each into
    a LoRA of rank min(`rank`, number of nonzero units): A (rank, in), B (out, rank)."""
    out_features = modules[0].B.shape[0]
    pool = units(modules, weights)
    if pool.shape[0] == 0:  # nothing to merge: a zero update (PEFT needs rank >= 1)
        return LoraModule(A=torch.zeros(1, modules[0].A.shape[1]),
                          B=torch.zeros(out_features, 1), scaling=1.0)
    labels = kmeans(pool, rank, generator)
    clusters = [pool[labels == c] for c in range(int(labels.max()) + 1)]
    centroids = torch.stack([members.mean(dim=0) for members in clusters])
    # Parameter reweighting: each centroid back to its units' mean norm.
    target = torch.stack([members.norm(dim=1).mean() for members in clusters])
    length = centroids.norm(dim=1)
    centroids = centroids * torch.where(length > 0, target / length, 1.0)[:, None]
    # Output reweighting: sqrt(r / k), the scale of a rank-r LoRA's output.
    output_scale = math.sqrt(max(m.rank for m in modules) / len(clusters))
    return LoraModule(A=centroids[:, out_features:].float().contiguous(),
                      B=centroids[:, :out_features].T.float().contiguous(),
                      scaling=output_scale)

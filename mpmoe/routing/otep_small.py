"""OTEP for a few tokens on CPU (decode steps): the greedy loop with its Sigma-only state memoised.

In OTEP's pivoted Cholesky (:mod:`mpmoe.routing.otep`) only the residuals ``r`` depend on the
token's probabilities ``p``. The factor rows ``a_t`` and the Schur complements ``s_t`` depend
on Sigma and on the experts picked so far, nothing else. An :class:`OtepCache` therefore keeps
them per *pick prefix*, as a trie over one Sigma:

* node: a sequence of picks (the root: none), with ``s`` after those picks;
* edge (node, j): the factor row of pick ``j`` after that sequence, and ``1 / sqrt`` of
  its pivot.

A token's round is then ``r * r / s[node]``, an argmax, and one fused update
``r -= row * (r_j / l)``, whatever ``t`` is. Decode steps keep revisiting the same prefixes (a
layer routes most tokens through a few hundred of them), so after the first steps rounds find
their entries. At one to 64 tokens every op's fixed cost is the whole cost: that is what this
path saves, not arithmetic.

The picks are identical to the blocked loop's: entries are computed with its arithmetic, op
for op, in the compute dtype (fp32, or fp64 for fp64 inputs): products, quotients, maxima and
``1 / sqrt`` (= PyTorch's CPU ``rsqrt``) in NumPy, which rounds them the same way; the fused
updates in PyTorch's ``addcmul_`` on ``torch.from_numpy`` views, since it rounds once (an FMA)
and NumPy has no FMA. Ties go to the lowest index (``argmax``'s first maximum); picked experts
get a gain of -inf. No ``allowed`` mask and no seeded tie-break here: ``otep_select`` runs
those through the blocked loop.

A cache is tied to one Sigma tensor and rebuilds itself when that tensor is replaced or
changed in place by PyTorch (its version counter); it holds at most ``max_nodes`` prefixes and
starts over when full.
"""

from __future__ import annotations

import re
import warnings
import weakref

import numpy as np
import torch

__all__ = ["OtepCache", "otep_small"]

# A degenerate Sigma can overflow the state (to inf, then NaN) here as in the blocked loop,
# where PyTorch says nothing. NumPy would warn; its floating-point warnings raised from this
# module are silenced once, here, rather than by np.errstate on every call (entering and
# leaving it costs about 10 us at a decode step, when NumPy's code is cold).
warnings.filterwarnings("ignore", category=RuntimeWarning, module=re.escape(__name__) + r"\Z")


class OtepCache:
    """Memo of OTEP's Sigma-only state by pick prefix; pass one per Sigma to ``otep_select``."""

    def __init__(self, max_nodes: int = 1 << 14) -> None:
        if max_nodes < 2:
            raise ValueError(f"OtepCache: max_nodes must be >= 2, got {max_nodes}")
        self.max_nodes = max_nodes
        self._ref = None  # weakref to the Sigma tensor the entries belong to
        self._key = None  # (dtype, eps, version) of that tensor
        self._n = 0

    def __len__(self) -> int:
        """Pick prefixes held (the empty one included)."""
        return self._n

    def prepare(self, sigma: torch.Tensor, dtype: torch.dtype, eps: float, k: int, room: int) -> None:
        """Make the entries belong to ``sigma`` (compute ``dtype``), with room for ``room``
        more prefixes of up to ``k - 1`` picks."""
        try:
            version = sigma._version
        except RuntimeError:  # an inference-mode tensor keeps no version: never reuse
            version = None
        key = (dtype, float(eps), version)
        if (version is None or self._ref is None or self._ref() is not sigma or self._key != key
                or self._n + room > self.max_nodes):
            self._build(sigma, dtype, eps)
            self._ref, self._key = weakref.ref(sigma), key
        if self.anc.shape[1] < k - 1:
            self._alloc(self.s.shape[0], k - 1)

    def _build(self, sigma, dtype, eps) -> None:
        sig = sigma.detach()
        if sig.dtype != dtype or sig.device.type != "cpu":
            sig = sig.to(device="cpu", dtype=dtype)
        sig = sig.numpy()
        self.sig = (sig + sig.T) * 0.5  # symmetrised as in the blocked loop
        self.eps = self.sig.dtype.type(eps)
        self._n = 0
        self._alloc(64, 1)
        np.maximum(self.sig.diagonal(), self.eps, out=self.s[0])  # the root: nothing picked
        self._n = 1
        self.edges: dict[int, int] = {}  # node * E + pick -> node
        self.views: dict[int, torch.Tensor] = {}  # node -> its factor row as a tensor
        # One token's residuals and r_j / l, reused by every call (and their tensor views).
        self.r1, self.z1 = np.empty(self.sig.shape[0], self.sig.dtype), np.empty(1, self.sig.dtype)
        self.r1_t, self.z1_t = torch.from_numpy(self.r1), torch.from_numpy(self.z1)

    def _alloc(self, capacity: int, depth: int) -> None:
        """Arrays for ``capacity`` nodes of up to ``depth`` picks, keeping the first ``self._n``:
        per node ``s`` (Schur complements), ``row`` (the factor row of its last pick),
        ``inv`` (1 / sqrt of that pick's pivot) and ``anc`` (the nodes of its picks, in order)."""
        shape, ftype, n = (capacity, self.sig.shape[0]), self.sig.dtype, self._n
        s, row, inv = np.empty(shape, ftype), np.empty(shape, ftype), np.empty(capacity, ftype)
        anc = np.zeros((capacity, depth), np.int64)
        if n:
            s[:n], row[:n], inv[:n] = self.s[:n], self.row[:n], self.inv[:n]
            anc[:n, : self.anc.shape[1]] = self.anc[:n]
        self.s, self.row, self.inv, self.anc = s, row, inv, anc
        self.row_t = torch.from_numpy(row)

    def child(self, node: int, j: int, depth: int) -> int:
        """The node after ``node`` (of ``depth`` picks) and pick ``j``, created if missing."""
        child = self.edges.get(node * self.sig.shape[0] + j)
        return int(self._extend(np.array([node]), np.array([j]), depth)[0]) if child is None else child

    def view(self, node: int) -> torch.Tensor:
        """``row[node]`` as a tensor (a node's row never changes)."""
        view = self.views.get(node)
        if view is None:
            view = self.views[node] = self.row_t[node]
        return view

    def children(self, nodes: np.ndarray, picks: np.ndarray, depth: int) -> np.ndarray:
        """The node after each (node, pick), created where missing; ``nodes`` hold ``depth`` picks."""
        keys = (nodes * self.sig.shape[0] + picks).tolist()
        got = [self.edges.get(key) for key in keys]
        if None in got:
            missing = {key: i for key, c, i in zip(keys, got, range(len(keys))) if c is None}
            index = np.fromiter(missing.values(), dtype=np.int64, count=len(missing))
            made = dict(zip(missing, self._extend(nodes[index], picks[index], depth).tolist()))
            got = [made[key] if c is None else c for key, c in zip(keys, got)]
        return np.array(got, dtype=np.int64)

    def _extend(self, parents: np.ndarray, picks: np.ndarray, depth: int) -> np.ndarray:
        """Add the edges (parent, pick) for parents of ``depth`` picks: the blocked loop's round
        ``depth`` for tokens whose picks so far are the parents' (the same ops on the same values)."""
        m = len(parents)
        capacity = self.s.shape[0]
        while self._n + m > capacity:
            capacity *= 2
        if capacity > self.s.shape[0] or self.anc.shape[1] < depth + 1:
            self._alloc(capacity, max(self.anc.shape[1], depth + 1))
        new = slice(self._n, self._n + m)
        ids = np.arange(self._n, self._n + m, dtype=np.int64)
        col, col_t = self.row[new], self.row_t[new]
        col[:] = self.sig[picks]
        a_j = np.empty((m, 1), self.sig.dtype)  # the pick's entry of an earlier factor row
        a_j_t = torch.from_numpy(a_j)
        for i in range(depth):  # earlier factor rows, in order: a -= a_i * a_i[j] (one rounding)
            rows_i = self.anc[parents, i]
            a_j[:, 0] = self.row[rows_i, picks]
            col_t.addcmul_(torch.from_numpy(self.row[rows_i]), a_j_t, value=-1.0)
        inv_l = self.sig.dtype.type(1.0) / np.sqrt(self.s[parents, picks])
        col *= inv_l[:, None]
        s = self.s[new]
        s[:] = self.s[parents]
        torch.from_numpy(s).addcmul_(col_t, col_t, value=-1.0)
        np.maximum(s, self.eps, out=s)
        self.inv[new] = inv_l
        self.anc[new] = self.anc[parents]
        self.anc[new, depth] = ids
        self.edges.update(zip((parents * self.sig.shape[0] + picks).tolist(), ids.tolist()))
        self._n += m
        return ids


def otep_small(probs: torch.Tensor, sigma: torch.Tensor, k: int, eps: float, dtype: torch.dtype,
               want_mask: bool, cache: OtepCache | None = None) -> torch.Tensor:
    """OTEP picks [T, k] (or the bool map [T, E]) of CPU ``probs`` in compute ``dtype``."""
    num_tokens, num_experts = probs.shape
    if cache is None:
        cache = OtepCache()
    cache.prepare(sigma, dtype, eps, k, room=num_tokens * (k - 1))
    if probs.requires_grad:
        probs = probs.detach()
    p = (probs if probs.dtype == dtype else probs.to(dtype)).numpy()
    if num_tokens == 1:
        picks = _one_token(p[0], k, cache)
        if not want_mask:
            return torch.tensor([picks], dtype=torch.long)
        mask = np.zeros((1, num_experts), dtype=bool)
        for j in picks:
            mask[0, j] = True
        return torch.from_numpy(mask)
    r = np.array(p, dtype=cache.sig.dtype)  # residuals, updated in place
    r_t = torch.from_numpy(r)
    rows = np.empty_like(r)
    rows_t = torch.from_numpy(rows)
    z = np.empty((num_tokens, 1), dtype=r.dtype)  # r_j / l per token
    z_t = torch.from_numpy(z)
    gain = np.empty_like(r)
    tok = np.arange(num_tokens)
    nodes = np.zeros(num_tokens, dtype=np.int64)
    picks = np.empty((num_tokens, k), dtype=np.int64)
    for t in range(k):
        np.multiply(r, r, out=gain)
        np.divide(gain, cache.s[nodes] if t else cache.s[0], out=gain)
        if t:
            gain[tok[:, None], picks[:, :t]] = -np.inf
        j = gain.argmax(axis=1)
        picks[:, t] = j
        if t == k - 1:
            break
        nodes = cache.children(nodes, j, t)
        np.take(cache.row, nodes, axis=0, out=rows)
        np.multiply(r[tok, j], cache.inv[nodes], out=z[:, 0])
        r_t.addcmul_(rows_t, z_t, value=-1.0)
    if not want_mask:
        return torch.from_numpy(picks)
    mask = np.zeros((num_tokens, num_experts), dtype=bool)
    mask[tok[:, None], picks] = True
    return torch.from_numpy(mask)


def _one_token(p: np.ndarray, k: int, cache: OtepCache) -> list:
    """:func:`otep_small` for one token (a decode step at batch 1): the same ops on the
    cache's 1-D buffers, with plain ints for the picks and nodes."""
    r, z, r_t, z_t = cache.r1, cache.z1, cache.r1_t, cache.z1_t  # (node arrays may grow: read them anew)
    r[:] = p
    node, picks = 0, []
    gain = r * r
    gain /= cache.s[0]
    for t in range(k):
        for j in picks:
            gain[j] = -np.inf
        j = int(gain.argmax())
        picks.append(j)
        if t == k - 1:
            return picks
        node = cache.child(node, j, t)
        z[0] = r[j] * cache.inv[node]
        r_t.addcmul_(cache.view(node), z_t, value=-1.0)
        gain = r * r
        gain /= cache.s[node]

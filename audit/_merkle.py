"""RFC 9162 Merkle tree hashing, proofs and their verification (SHA-256).

Terms follow RFC 9162 §2.1:

* ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``.
* ``MTH(D[n])`` is the Merkle Tree Hash of ``n`` leaves: for ``n > 1`` split at ``k``,
  the largest power of two smaller than ``n``.
* A *perfect subtree* ``(level, index)`` covers the ``2**level`` leaves starting at
  ``index * 2**level``. Every range the RFC's recursion produces (``PATH`` and
  ``SUBPROOF``) is a run of perfect subtrees of strictly decreasing size, so its hash
  is a right fold of at most ``log2 n`` stored perfect-subtree hashes.

Proof *generation* is expressed over a ``subtree_hash(start, end)`` getter, so the
same code serves an in-memory tree and the database store. Proof *verification*
implements the algorithms of §2.1.3.2 and §2.1.4.2 literally and treats any
malformed input as a failed verification (``False``), never as a crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

HASH_SIZE = 32
"""Length of every SHA-256 hash in the tree."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}) of the empty tree (RFC 9162 §2.1.1)."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

SubtreeHash = Callable[[int, int], bytes]
"""Returns MTH(D[start:end]) for a range produced by the RFC recursion."""


def leaf_hash(data: bytes) -> bytes:
    """MTH({d0}) = SHA-256(0x00 || d0)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right) for an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """k: the largest power of two strictly smaller than ``n`` (requires n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def merkle_tree_hash(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) given the leaf hashes of D[n]; the reference full recomputation."""
    if not leaf_hashes:
        return EMPTY_ROOT
    edge = CompactRange()
    for h in leaf_hashes:
        edge.append(h)
    return edge.root()


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The aligned perfect subtrees ``(level, index)`` covering [start, end), left to right.

    Greedy: each step takes the largest aligned power-of-two block that fits. For the
    ranges of the RFC recursion this yields blocks of strictly decreasing size.
    """
    blocks: list[tuple[int, int]] = []
    while start < end:
        level = (end - start).bit_length() - 1
        while start & ((1 << level) - 1):
            level -= 1
        blocks.append((level, start >> level))
        start += 1 << level
    return blocks


def fold_subtrees(hashes: Sequence[bytes]) -> bytes:
    """MTH of a recursion range from its perfect-subtree hashes (largest first).

    MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n])) with D[0:k] perfect, recursively,
    which is the right fold node(p1, node(p2, ... node(pm-1, pm))).
    """
    if not hashes:
        raise ValueError("a range covers at least one leaf")
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_path_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTH make up PATH(index, D[size]) (RFC 9162 §2.1.3.1), bottom-up."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    # Walk from the root down; the RFC appends the sibling after the sub-path, so the
    # top-down list is reversed at the end.
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_proof_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """Leaf ranges whose MTH make up PROOF(first, D[second]) (RFC 9162 §2.1.4.1)."""
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof between sizes {first} and {second}")
    ranges: list[tuple[int, int]] = []
    start, end, m = 0, second, first
    complete = True  # the RFC's flag b: is D[start:end]'s left part the whole old tree
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
            m -= k
            complete = False
    if not complete:
        ranges.append((start, end))
    ranges.reverse()
    return ranges


def inclusion_proof(index: int, size: int, subtree_hash: SubtreeHash) -> list[bytes]:
    """The audit path for leaf ``index`` in the tree of ``size`` leaves."""
    return [subtree_hash(s, e) for s, e in inclusion_path_ranges(index, size)]


def consistency_proof(first: int, second: int, subtree_hash: SubtreeHash) -> list[bytes]:
    """The consistency proof between tree sizes ``first`` and ``second``."""
    return [subtree_hash(s, e) for s, e in consistency_proof_ranges(first, second)]


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` under ``root``?"""
    if not (_is_size(index) and _is_size(size) and index < size):
        return False
    if not (_is_hash(leaf) and _is_hash(root) and all(_is_hash(p) for p in proof)):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False  # proof longer than the path
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # Skip the levels where this node has no right sibling (right edge).
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, proof: Sequence[bytes], first_root: bytes, second_root: bytes
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of size ``second`` an extension of the one of ``first``?

    Equal sizes need an empty proof and equal roots (compared as given, as the RFC
    states). A ``first`` of 0 is refused: consistency with the empty tree proves nothing.
    """
    if not (_is_size(first) and _is_size(second)) or first == 0 or first > second:
        return False
    if not all(isinstance(p, bytes) for p in proof):
        return False
    if first == second:
        return (
            not proof
            and isinstance(first_root, bytes)
            and isinstance(second_root, bytes)
            and first_root == second_root
        )
    if not (_is_hash(first_root) and _is_hash(second_root) and proof):
        return False
    if not all(_is_hash(p) for p in proof):
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        # The old tree is a perfect subtree of the new one: its root is the first node.
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


class CompactRange:
    """The right edge of a growing tree: one perfect-subtree root per set bit of its size.

    Invariant: ``self._edge[level]`` is the hash of perfect subtree
    ``(level, (size >> level) - 1)`` for each bit ``level`` set in ``size``. Appending a
    leaf merges equal-sized subtrees like a binary carry, so each append costs
    O(log n) hashes and reports every perfect subtree it completes.
    """

    __slots__ = ("_edge", "_size")

    def __init__(self, size: int = 0, edge: dict[int, bytes] | None = None) -> None:
        edge = dict(edge or {})
        levels = {level for level in range(size.bit_length()) if size >> level & 1}
        if set(edge) != levels:
            raise ValueError(f"a right edge for size {size} needs levels {sorted(levels)}")
        self._size = size
        self._edge = edge

    @staticmethod
    def edge_nodes(size: int) -> list[tuple[int, int]]:
        """The perfect subtrees ``(level, index)`` a right edge of ``size`` consists of."""
        return [
            (level, (size >> level) - 1) for level in range(size.bit_length()) if size >> level & 1
        ]

    @property
    def size(self) -> int:
        return self._size

    def edge(self) -> dict[int, bytes]:
        """A copy of the right edge: level -> perfect-subtree hash."""
        return dict(self._edge)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; returns the perfect subtrees it completes, leaf first."""
        index = self._size
        completed = [(0, index, leaf)]
        acc, level = leaf, 0
        while index >> level & 1:
            acc = node_hash(self._edge.pop(level), acc)
            level += 1
            completed.append((level, index >> level, acc))
        self._edge[level] = acc
        self._size += 1
        return completed

    def root(self) -> bytes:
        """MTH of the leaves appended so far."""
        if self._size == 0:
            return EMPTY_ROOT
        return fold_subtrees([self._edge[lv] for lv in sorted(self._edge, reverse=True)])


def subtree_hash_from(
    nodes: dict[tuple[int, int], bytes],
) -> SubtreeHash:
    """A ``subtree_hash`` getter over a mapping of perfect-subtree hashes."""

    def subtree_hash(start: int, end: int) -> bytes:
        return fold_subtrees([nodes[block] for block in perfect_subtrees(start, end)])

    return subtree_hash


def nodes_for_ranges(ranges: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """All perfect subtrees needed to hash the given recursion ranges."""
    return {block for s, e in ranges for block in perfect_subtrees(s, e)}

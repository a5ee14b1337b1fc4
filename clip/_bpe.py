"""Byte-pair merging of one word's symbols: a list scan for short words, a heap for long ones (the original's rounds
are quadratic in the word's length). It must never give other symbols than the original's merge.
"""
import heapq
from typing import Dict, List, Sequence, Set, Tuple

Ranks = Dict[Tuple[str, str], int]

# Words up to this many symbols (UTF-8 bytes) take the list scan, longer ones the heap: where each is faster
# (benchmarks/README.md, "Merge: scan or heap").
SCAN_LIMIT = 6
# Above any merge rank: the rank of a pair that is not a merge, for the scan's min().
_NO_MERGE = 1 << 62


def get_pairs(word: Sequence[str]) -> Set[Tuple[str, str]]:
    """Return the set of adjacent symbol pairs of ``word`` (a sequence of at least one symbol)."""
    return set(zip(word[:-1], word[1:]))


def merge(symbols: List[str], ranks: Ranks) -> List[str]:
    """Merge a word's symbols by rank as the original does; the list scan for short words, the heap for long ones.

    Parameters
    ----------
    symbols : list of str
        The word's byte symbols, the last already carrying the end-of-word marker. Not modified.
    ranks : dict
        Merge pair to rank (lower merges first); each rank belongs to one pair.

    Returns
    -------
    list of str
        The merged symbols, in order.
    """
    if len(symbols) <= SCAN_LIMIT:
        return merge_by_scan(symbols, ranks)
    return merge_by_heap(symbols, ranks)


def merge_by_scan(symbols: List[str], ranks: Ranks) -> List[str]:
    """The original's rounds on a list: O(n) per round, up to n rounds. Fastest for short words."""
    rank_of = ranks.get
    while len(symbols) > 1:
        pair_ranks = [rank_of(pair, _NO_MERGE) for pair in zip(symbols, symbols[1:])]
        best = min(pair_ranks)
        if best == _NO_MERGE:
            break
        # Ranks are unique to a pair, so the first index with the best rank is the pair's first occurrence.
        i = pair_ranks.index(best)
        first, second = symbols[i], symbols[i + 1]
        merged = symbols[:i]
        n = len(symbols)
        while i < n:
            if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def merge_by_heap(symbols: List[str], ranks: Ranks) -> List[str]:
    """The original's rounds with a heap of merge candidates over a linked list: O(n log n).

    Nodes are the input indices; a merge keeps the left node. ``pair_rank[i]`` is the rank of live node i's pair with
    the next live node (None if none); the heap holds ``rank * n + node``, so a round's occurrences pop left to right,
    and a popped candidate whose node's rank has changed is stale (an overlap the original skips too). Pairs a round
    creates enter the heap only when it ends, as the original merges them only in a later round.
    """
    n = len(symbols)
    symbols = list(symbols)  # symbols[i]: the symbol of the live node i (dead nodes keep their last one, unread)
    following = list(range(1, n + 1))  # the live node after live node i, n after the last
    preceding = list(range(-1, n - 1))  # the live node before live node i, -1 before the first
    rank_of = ranks.get
    pair_rank = list(map(rank_of, zip(symbols, symbols[1:])))
    pair_rank.append(None)  # the last node has no pair
    heap = [rank * n + i for i, rank in enumerate(pair_rank) if rank is not None]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        rank = heap[0] // n
        first, end_of_round = rank * n, (rank + 1) * n
        created = []
        while heap and heap[0] < end_of_round:
            i = pop(heap) - first
            if pair_rank[i] != rank:
                continue  # stale: node i is dead, or its pair has changed
            right = following[i]
            symbols[i] += symbols[right]
            after = following[right]
            following[i] = after
            pair_rank[right] = None  # node right is dead
            before = preceding[i]
            if before >= 0:
                new_rank = pair_rank[before] = rank_of((symbols[before], symbols[i]))
                if new_rank is not None:
                    created.append(new_rank * n + before)
            if after < n:
                preceding[after] = i
                new_rank = pair_rank[i] = rank_of((symbols[i], symbols[after]))
                if new_rank is not None:
                    created.append(new_rank * n + i)
            else:
                pair_rank[i] = None
        for candidate in created:
            push(heap, candidate)
    merged = []
    i = 0
    while i < n:
        merged.append(symbols[i])
        i = following[i]
    return merged

"""Byte-pair merging: one word's symbols to its BPE symbols, exactly as the original merges them.

The original repeats one round until no adjacent pair is a merge: take the lowest-ranked adjacent pair and merge
all its occurrences, left to right, skipping an occurrence that overlaps the one just merged ("a a a" gives
"aa a"). Each round rescans the word, so a word of n symbols costs up to n rounds of O(n): quadratic. The
shortest words take a list scan of that algorithm; the others a heap that gives the same symbols in O(n log n).
The README says what the tokenizer promises; this module is the merge step alone.
"""
import heapq
from typing import Dict, List, Sequence, Set, Tuple

Ranks = Dict[Tuple[str, str], int]

# Words up to this many symbols (UTF-8 bytes) take the list scan, longer ones the heap. Measured on the distinct
# words of benchmarks/tokenizer.py's prompts and captions: the scan is faster up to 6 bytes (twice as fast at 2-3,
# where the heap's set-up dominates), the heap from 7 on (20-40% faster at 10-16 bytes, and O(n log n) beyond).
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

    Each symbol is a node named by the index where it starts in the input; a merge keeps the left node and drops the
    right one, so live nodes stay in input order. ``pair_rank[i]`` is the rank of the pair that live node i forms
    with the next live node (None when that pair is not a merge, when i is the last node, or dead). The heap holds
    one integer per candidate, ``rank * n + node``: it orders by rank, then by node. A popped candidate is current
    when ``pair_rank`` of its node still equals its rank: each rank belongs to one pair, so the node's pair is then
    the pair that was pushed. Other candidates are stale and skipped.

    Why this gives the original's symbols, round by round (a round: one rank, all its occurrences):

    1. At the start of a round every adjacent pair that is a merge has a candidate in the heap (each pair gets one
       when it forms), so the heap's lowest current rank is the lowest-ranked pair of the word: the pair the
       original picks. A round whose rank has only stale candidates merges nothing.
    2. Within the round, candidates of that rank pop in node order, which is word order: left to right, as the
       original scans. Merging the pair (A, B) at node i kills node i's right neighbour, so an overlapping
       occurrence that starts there is stale when it pops, as the original skips it ("a a a a" gives "aa aa").
       Merging creates no new occurrence: the new pairs (x, AB) and (AB, y) would need AB == B or AB == A, but AB is
       longer than both. So the round merges exactly the occurrences the original's scan merges.
    3. The pairs a round creates wait in ``created`` and enter the heap when the round ends. Pushed at once, a
       created pair ranked below the round's would pop before the round's remaining occurrences and could take a
       symbol one of them needs, where the original merges it only in a later round. CLIP's vocabulary has no such
       pair (each symbol comes from one merge, ranked below every pair that uses the symbol), but a vocabulary passed
       in may: "abc" can come from (ab, c) early and from (a, bc) late, and (abc, a) can rank between.
    4. The heap empties only when no adjacent pair is a merge, where the original stops too.

    Every merge pushes at most two candidates, so there are at most 3n pushes and pops, each O(log n). (Integers
    rather than tuples of rank and node: a third faster.)
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

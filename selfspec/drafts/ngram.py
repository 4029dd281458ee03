"""An incremental n-gram index over a growing token sequence: what followed the latest earlier occurrence of
the sequence's tail. It is what a context draft copies from, so its cost per token must not grow with length.
"""


class NgramIndex:
    """Maps every n-gram (min_n <= n <= max_n) seen so far to where the token after its latest occurrence sits.

    An n-gram is indexed only once the token after it exists, so the sequence's own tail never matches itself.
    """

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.follower: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the index `token` gets; it follows the n-grams ending just before it
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.follower[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, width: int) -> list[int]:
        """Up to `width` tokens that followed the longest tail n-gram seen before (most recent occurrence)."""
        length = len(self.tokens)
        for n in range(min(self.max_n, length), self.min_n - 1, -1):
            start = self.follower.get(tuple(self.tokens[length - n :]))
            if start is not None:
                return self.tokens[start : start + width]
        return []

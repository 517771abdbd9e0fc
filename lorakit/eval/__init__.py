"""What a tuned causal LM now says: batched greedy generation, and the score of its final answers."""

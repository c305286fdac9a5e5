"""Shared helpers for the model / objective tests: random batches in the loader's format."""
import torch

EOT = 49407
SOT = 49406


def random_tokens(n: int, generator: torch.Generator, context_length: int = 77) -> torch.Tensor:
    """SOT, random BPE ids, EOT at a random position, zero padding (the tokenizer's layout)."""
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, context_length - 1, (1,), generator=generator))
        tokens[i, 0] = SOT
        tokens[i, 1:length] = torch.randint(1, SOT, (length - 1,), generator=generator)
        tokens[i, length] = EOT
    return tokens


def random_batch(n: int, image_size: int = 64, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = lambda: torch.randn(n, 3, image_size, image_size, generator=g).to(dtype)  # noqa: E731
    return {"clip_image": image(), "ssl_image_1": image(), "ssl_image_2": image(),
            "text": random_tokens(n, g)}

"""gpt2repro: GPT-2 reproduced end to end (model, weights, tokenizer, data, training, eval, sampling)."""

from gpt2repro.config import GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.model import GPT

__all__ = ["GPT", "GPTConfig", "UserError"]
__version__ = "0.1.0"

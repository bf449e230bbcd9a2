"""Preference pairs and RL prompts: readers, tokenisation/packing, deterministic loaders.

    read_preferences / read_prompts -> tokenize_preferences / tokenize_prompts -> make_loader
"""

from infalign_jax.data.pipeline import (Loader, LoaderConfig, batch_indices, dropped_per_epoch,
                                        epoch_permutation, example_index, global_batch_indices,
                                        make_loader, steps_per_epoch)
from infalign_jax.data.readers import (DataError, PreferenceExample, PromptExample, SkipReport,
                                       detect_format, read_preferences, read_prompts)
from infalign_jax.data.tokenize import (PackedPairs, PackedPrompts, TokenizeConfig, as_encoder,
                                        tokenize_preferences, tokenize_prompts)

__all__ = [
    "DataError", "Loader", "LoaderConfig", "PackedPairs", "PackedPrompts", "PreferenceExample",
    "PromptExample", "SkipReport", "TokenizeConfig", "as_encoder", "batch_indices",
    "detect_format", "dropped_per_epoch", "epoch_permutation", "example_index",
    "global_batch_indices", "make_loader", "read_preferences", "read_prompts", "steps_per_epoch",
    "tokenize_preferences", "tokenize_prompts",
]

"""Datasets to model inputs: sources (`sources/`), samples (`schema`), features (`features`),
padded batches (`batching`), pipelines (`pipeline`), the synthetic dataset (`synthetic`).

A batch for a raw forward, from one input of your own (README "Using the models"):

    from x2sam_jax.data import Collator, Phrase, Sample, make_features
    sample = Sample(dataset="mine", task="ref_seg", sample_id="0", frames=["photo.jpg"], height=0,
                    width=0, phrases=[Phrase("the red circle", instance_indices=[])], has_targets=False)
    features = make_features(sample, tokenizer=tokenizer, train=False, rng=np.random.default_rng(0),
                             sam_size=S, region_tokens=model.config.region_tokens)
    batch = Collator(pad_token_id=tokenizer.pad_token_id, sam_size=S)([features])
"""

# Imported on first use, so that `import x2sam_jax.data.<module>` stays as light as that module.
_EXPORTS = {"Sample": "schema", "Phrase": "schema", "Instance": "schema", "VisualPrompt": "schema",
            "BadSample": "schema", "make_features": "features", "Collator": "batching",
            "BucketConfig": "batching"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"x2sam_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'x2sam_jax.data' has no attribute {name!r}")

"""Files that are safe to write and to read back: ``atomic`` (writes that replace a destination in
one step and never anything that is not theirs), ``checksums`` (array checksums, verification of
restored trees). Used by the model directories (``x2sam_jax.model_checkpoint``), the training
checkpoints (``x2sam_jax.train.run_checkpoint``) and the converters."""

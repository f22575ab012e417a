"""How per-example gradients are computed: `general` (vmap(grad) of any loss over
fixed-shape chunks) and `packed` (several LM examples per row, one batched backward,
for models that implement `packed.PackedModel`)."""

"""The engine's forward: a model's layers run over one position-indexed KV cache (`cache`, `runner`), through the
model's own modules (`adapter`) or fused copies of its weights (`fused`, with each family's layer in `families/`),
as eager passes or compiled graphs (`compiled`, calling the products by handle through `graph_ops`)."""

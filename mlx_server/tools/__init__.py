"""Tool calls and reasoning in generated text: per-family incremental parsers (`parsers`), the
`<think>` splitter (`reasoning`), format detection (`detect`) and the chain the stream actor
feeds (`output`). Pure code: no MLX, trio or quart imports."""

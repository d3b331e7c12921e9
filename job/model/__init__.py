"""The base model: where it comes from (Hub, store, local, the builtin tiny model), its tokenizer,
and loading the weights from safetensors only."""

"""Training data, from files to masked token ids: read and validate records, detect formats, render
chat templates with loss masks, truncate, pack, cache the tokenized splits."""

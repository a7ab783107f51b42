"""Using a trained model directory: load it, generate (one, streamed, batched), evaluate loss and answers.

generate.py  loading a model or adapter directory and generating from prompts
evaluate.py  token loss / perplexity on a file and generation metrics (exact match, ...)

The training loop calls both for its evaluations and samples; the terminal commands are in cli/infer.py.
May import: model, data, run.
"""

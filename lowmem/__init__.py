"""Low-memory trainer for Hugging Face language models: streaming data, exact resume, Accelerate loop.

Packages by concern; imports run one way, from the command line down to process plumbing:

    cli -> train -> infer -> checkpoint -> model, data -> fields -> run

cli         command-line words and the commands they start (train_low_mem.py is its thin entry)
train       a run: set-up, the loop, its state, objectives, metrics, optimizer, memory plan
infer       generation and offline evaluation of a trained model directory
checkpoint  checkpoints and exports: the only code that writes or reads a run's checkpoint directories
model       building and shaping the model: presets, adapters, MoE, attention, recompute, chunked loss
data        from raw files to batches: preparation, tokenizer, templates, streaming readers, packing
fields      the rules every config field carries (read by the flag table, validation and resume)
run         process-level plumbing: the Accelerator, distributed launch, errors, private library writes

Each package's docstring ends with a `May import:` line; tests/test_import_graph.py holds every import to it.
"""

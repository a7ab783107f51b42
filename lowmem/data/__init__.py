"""From raw files to batches: preparation tools, tokenizer, the prompt template, streaming readers, packing.

sources.py registers what a data argument names and what kind a file holds; tables.py, stream.py, mixture.py
read rows by index; encoding.py, template.py turn them into tokens; batches.py, pairs.py into batches;
shards.py cuts a batch for sequence parallelism; pipeline.py is the loop's view. token_file.py, sft_cache*.py and reference_cache.py are files built once.
prepare.py, rawio.py, parquet_sink.py, tokenizer.py, demo.py serve the `prepare` tools and the bundled demo.

The data layer takes DataOptions/DataInputs (options.py), never the training config, and no model code.
May import: run.
"""

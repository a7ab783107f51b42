"""A training run: set-up, the loop, the state it resumes from, what a step minimises and what it reports.

session.py      everything a run needs before its first step, in an order that never harms an existing run
loop.py         each optimizer step, then logging, evaluation, saving, stopping
state.py        counters and the data position, saved with each checkpoint
objective.py    token loss; preference.py and reference.py: preference losses and their reference log-probs
validate.py     a config's cross-field rules, checked before anything is built (show_config refuses the same)
memory_plan.py  per-process memory and the longest length that fits; plan.py the `plan` command;
                autobatch.py the largest micro-batch that fits
metrics.py, summary.py, nonfinite.py, ema.py, optim.py, ownership.py: one job each, named by the file

ownership.py (the run lock, a fresh start over an existing run) sits here, beside its one caller, because it
reads the checkpoint list; validate.py because it asks the model package which options exist.
May import: infer, checkpoint, model, data, fields, run.
"""

"""The command line: flag words turned into typed values, the commands they start, and the flag docs.

flags.py    words -> validated values: type conversion, unknown/repeated flags, presets, quiet imports
prepare.py  `prepare <tool>`: the data tools as commands
infer.py    `generate`, `chat` and `evaluate` on a trained model (the chat REPL lives here, not in infer/)
docs.py     --help and the README flag table, read from each field's rules

Nothing imports cli: it is the top, so a library user of train/ or infer/ never pays for Fire or its checks.
May import: train, infer, checkpoint, model, data, fields, run.
"""

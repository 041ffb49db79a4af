"""The CLI's subcommands, one module each: `add_arguments(parser)` declares the flags and `run(args)`
parses them into the Python function that does the work (pissa_fast.init_checkpoint,
pissa_fast.convert_to_lora, pissa_fast.verify) and prints its report. Exit status: 0 done, 1 a
negative answer (verify), 2 bad input, 130 interrupted."""

"""The peft versions the backend is tested against. Pure data: setup.py reads this file without
importing the package (extras_require["peft"])."""

PEFT_SPECIFIER = ">=0.18,<0.22"  # tested: 0.18.1 (LLaMA-Factory 0.9.5's pin) and 0.21.2
TESTED_PEFT = ("0.18.1", "0.21.2")

"""The baselines of the paper's Table 1, trained on the live backbone with READ's splits, label words and metric.

    read-cache train --method lora-8 --model t5-small --task sst2 --data-dir ../shared/glue
    read-cache bench --model $MINILM --task sst2 --methods full,lora-8,prompt-20,adapter-64,bitfit,lst-8 --out bench/

A method is named `NAME` or `NAME-SIZE`; SIZE is the method's one size knob (the paper's grid in
`read_cache.kinds.METHOD_SIZES`, the default in `DEFAULT_METHOD_SIZE`):

    full     every backbone weight trains                                  (no size)
    lora     LoRA on the attention query and value projections (peft)     rank 8 | 32
    prompt   prompt tuning: trainable virtual tokens before the input     10 | 20 | 30 tokens
    adapter  Houlsby bottleneck adapters after every attention and FF     32 | 64 bottleneck width
    bitfit   only biases (T5 has none: zero-initialised ones are added)   (no size)
    lst      Ladder Side-Tuning: a 1/SIZE-width side copy fed by ladders   reduction 8

Each method's module (`read_cache.methods.lora`, ...) has the same two functions:
`adapt(model, kind, size)` freezes the backbone and adds (or unfreezes) the method's own parameters,
returning what `TaskModel` runs, and `expected_parameters(config, kind, size)` is the formula for how
many parameters that adds, which the tests hold the code to. The names, sizes and default
learning rates live in the torch-free `read_cache.kinds`, so the CLI checks a method name before anything loads.
"""
